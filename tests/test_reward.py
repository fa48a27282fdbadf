"""`rlhf reward` and the learned reward in PPO: the pairwise maths on hand-worked scores, a short training run's
outputs and rising accuracy, exact resume, one-line refusals of bad input that write nothing, and the reward adapter
scored on the policy's own weights without disturbing the policy or its reference."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from conftest import cli
from safetensors.torch import load_file, save_file

from rlhf import modeling
from rlhf.config import LoraConfig, ModelConfig
from rlhf.io import read_jsonl
from rlhf.reward_model.loss import accuracy, pair_stats, pairwise_loss
from rlhf.rewards import load_spec
from rlhf.rl.policy import Policy, ValueHead
from rlhf.rl.prompts import left_pad
from rlhf.rl.reward import (
    REWARD_ADAPTER,
    SharedBaseReward,
    check_same_base,
    last_token_index,
    load_score_head,
    sequence_scores,
)

# A short run that learns: 60 steps of 8 pairs at a high learning rate (the quickstart's 400 reach ~0.98).
SHORT = ["reward_model.max_steps=60", "reward_model.batch_size=8", "reward_model.learning_rate=3e-3",
         "reward_model.eval_pairs=64"]  # fmt: skip
TINY = ["reward_model.batch_size=4", "reward_model.eval_pairs=8", "reward_model.save_steps=3",
        "reward_model.lr_scheduler=constant"]  # fmt: skip


def _reward(run, *extra) -> int:
    return cli("reward", "--recipe", "quickstart", "--run", run, *extra)


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory, merged_run):
    run = tmp_path_factory.mktemp("reward") / "run"
    shutil.copytree(merged_run, run)
    assert _reward(run, *SHORT) == 0
    return run


def _tree(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- the maths, by hand ----------------------------------------------------------------------------------------


def test_pairwise_loss_and_accuracy_by_hand():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0])
    # -log sigmoid(2) = log(1 + e^-2) = 0.126928; -log sigmoid(0) = log 2 = 0.693147
    assert pairwise_loss(chosen, rejected).item() == pytest.approx((0.126928 + 0.693147) / 2, abs=1e-6)
    # margin 1: -log sigmoid(1) = 0.313262; -log sigmoid(-1) = 1.313262
    assert pairwise_loss(chosen, rejected, margin=1.0).item() == pytest.approx((0.313262 + 1.313262) / 2, abs=1e-6)
    # penalty 0.1 x mean of the squared scores (4, 0, 0, 0) = 0.1 x 1.0
    assert pairwise_loss(chosen, rejected, score_penalty=0.1).item() == pytest.approx(0.410038 + 0.1, abs=1e-6)
    assert accuracy(chosen, rejected) == 0.5  # the tie orders nothing: it counts as wrong
    stats = pair_stats(torch.tensor([3.0, 1.0, -1.0]), torch.tensor([1.0, 2.0, -2.0]))
    assert stats["accuracy"] == pytest.approx(2 / 3) and stats["margin_mean"] == pytest.approx((2 - 1 + 1) / 3)
    assert stats["n_pairs"] == 3 and stats["chosen_mean"] == pytest.approx(1.0)
    # the gradient pushes the two sides apart, equally
    c, r = torch.tensor([0.0], requires_grad=True), torch.tensor([0.0], requires_grad=True)
    pairwise_loss(c, r).backward()
    assert c.grad.item() == pytest.approx(-0.5) and r.grad.item() == pytest.approx(0.5)


def test_score_is_read_at_the_last_real_token_whatever_the_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [0, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert last_token_index(mask).tolist() == [2, 4, 2, 4]


def test_preference_fixture_prefers_the_more_favourable_continuation(fixture_paths):
    from rlhf.fixtures import cue_balance, resolve_fixture

    root = resolve_fixture("fixture:imdb-preferences")
    for split in ("train", "test"):
        rows = read_jsonl(root / f"{split}.jsonl")
        assert len(rows) > 500 and all(set(r) == {"prompt", "chosen", "rejected"} for r in rows)
        assert all(r["chosen"].strip() and r["rejected"].strip() and r["chosen"] != r["rejected"] for r in rows)
        # the rule a person would apply: the chosen side reads more favourably than the rejected one
        assert all(cue_balance(r["prompt"] + r["chosen"]) > cue_balance(r["prompt"] + r["rejected"]) for r in rows)
        # and length tells nothing: the chosen side is the longer one about half the time
        longer = sum(len(r["chosen"]) > len(r["rejected"]) for r in rows) / len(rows)
        assert 0.35 < longer < 0.65, longer


# --- a short run ------------------------------------------------------------------------------------------------


def test_short_run_writes_its_outputs_and_accuracy_rises(reward_run):
    adapter = reward_run / "reward/adapter"
    for name in ("adapter_config.json", "adapter_model.safetensors", "score_head.safetensors", "reward_model.json"):
        assert (adapter / name).is_file(), name
    assert set(load_file(adapter / "score_head.safetensors")) == {"score.weight", "score.bias"}
    rows = read_jsonl(reward_run / "reward/metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 61))
    for key in ("loss", "accuracy", "margin_mean", "lr", "grad_norm", "tokens_per_s", "peak_mem_bytes"):
        assert math.isfinite(rows[-1][key]), key
    ev = json.loads((reward_run / "reward/eval.json").read_text())
    assert ev["n_pairs"] == 64 and ev["steps"] == 60 and ev["eval_split"] == "test"
    assert ev["accuracy_after"] >= ev["accuracy_before"] + 0.1, (ev["accuracy_before"], ev["accuracy_after"])
    assert ev["margin_mean_after"] > ev["margin_mean_before"] + 0.3
    # centred: held-out answers score 0 on average, so score > 0 reads "better than the typical answer"
    assert ev["chosen_mean_after"] + ev["rejected_mean_after"] == pytest.approx(0.0, abs=1e-4)
    assert len(ev["samples_after"]) == 4
    recipe = (reward_run / "recipe.yaml").read_text()
    assert "reward_model:" in recipe and "max_steps: 60" in recipe
    assert (reward_run / "reward/checkpoints/step-60").is_dir()


def test_readme_snippet_loads_the_reward_model_with_plain_peft(reward_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = reward_run / "reward/adapter"
    base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    # The README's two lines:
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    head = load_file(adapter / "score_head.safetensors")

    tok = AutoTokenizer.from_pretrained(base)
    texts = [s[side] for s in json.loads((reward_run / "reward/eval.json").read_text())["samples_after"]
             for side in ("chosen", "rejected")]  # fmt: skip
    ids = torch.tensor([tok(texts[0])["input_ids"] + [tok.eos_token_id]])
    with torch.no_grad():
        hidden = model.get_base_model().base_model(input_ids=ids).last_hidden_state[:, -1].float()
        by_hand = hidden @ head["score.weight"].T + head["score.bias"]
        ours = sequence_scores(model, load_score_head(adapter, torch.device("cpu")), ids, torch.ones_like(ids))
    assert torch.allclose(by_hand.squeeze(-1), ours, atol=1e-6)
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in model.named_parameters()), "the trained adapter"


def test_resume_continues_exactly(merged_run, copy_run):
    straight = copy_run(merged_run, "straight")
    assert _reward(straight, *TINY, "reward_model.max_steps=6") == 0
    split = copy_run(merged_run, "split")
    assert _reward(split, *TINY, "reward_model.max_steps=3") == 0
    assert _reward(split, *TINY, "reward_model.max_steps=6", "--resume") == 0
    a, b = read_jsonl(straight / "reward/metrics.jsonl"), read_jsonl(split / "reward/metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-6)
    for name in ("adapter_model.safetensors", "score_head.safetensors"):
        fa, fb = load_file(straight / "reward/adapter" / name), load_file(split / "reward/adapter" / name)
        assert fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa), name
    assert _reward(split, *TINY, "reward_model.max_steps=6") == 2  # done: --resume or --force, never silently again


# --- bad input: one line, exit 2, nothing written ---------------------------------------------------------------


@pytest.mark.parametrize(
    "rows, expected",
    [
        ([{"prompt": "It was", "preferred": " great", "rejected": " bad"}], "no column 'chosen'"),
        ([{"chosen": "It was great", "rejected": "It was bad"}, {"chosen": "It was fine", "rejected": " "}], "row 1"),
    ],
    ids=["missing-chosen-column", "empty-side"],
)
def test_bad_preference_data_is_one_line_and_writes_nothing(merged_run, copy_run, tmp_path, capsys, rows, expected):
    run = copy_run(merged_run)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = _tree(run)
    assert _reward(run, "--dataset", data) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1, err
    assert _tree(run) == before


def test_reward_dir_of_another_base_is_refused(reward_run, merged_run, copy_run, capsys):
    same = copy_run(merged_run, "same")  # a copy of the same weights is the same base, wherever it lives
    check_same_base(reward_run / "reward/adapter", same / "merged")
    other = copy_run(merged_run, "other")
    weights = load_file(other / "merged/model.safetensors")
    name = next(k for k in weights if "query_key_value.weight" in k)
    weights[name] = weights[name] + 0.01  # another merge: the same shapes, other values
    save_file(weights, str(other / "merged/model.safetensors"), metadata={"format": "pt"})
    before = _tree(other)
    code = cli("ppo", "--recipe", "quickstart", "--run", other, "--reward", reward_run / "reward", "ppo.max_steps=1")
    err = capsys.readouterr().err.strip()
    assert code == 2 and "another base" in err and len(err.splitlines()) == 1, err
    assert _tree(other) == before


# --- the learned reward inside PPO ------------------------------------------------------------------------------


def test_reward_adapter_leaves_policy_and_reference_bit_identical(reward_run):
    merged = reward_run / "merged"
    base = modeling.load_base(ModelConfig(name=str(merged), quantization="8bit", dtype="float32"), merged)
    modeling.prepare_for_training(base, gradient_checkpointing=True)
    model = modeling.add_lora(base, LoraConfig(rank=8, alpha=16, dropout=0.0))
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)  # a policy that differs from its reference
    policy = Policy(model, ValueHead(base.config.hidden_size)).train()
    tok = modeling.load_tokenizer(merged)
    ids, mask = left_pad([tok(t, add_special_tokens=False)["input_ids"] for t in ("So I saw it", "It was")], 0, "cpu")

    def passes():
        with torch.no_grad():
            own = policy.score(ids, mask, 2, entropy=True)
            with policy.reference():
                ref = policy.score(ids, mask, 2, values=False)
        return own.logprobs, own.values, own.entropy, ref.logprobs

    flags = [(p, p.requires_grad) for p in model.parameters()]
    without = passes()
    reward = SharedBaseReward(model, reward_run / "reward/adapter", tok, batch_size=8)
    scores = reward.score_tokens(["So I saw it", "It was"], ids, mask).scores
    with_adapter = passes()
    assert all(torch.equal(a, b) for a, b in zip(without, with_adapter)), "policy or reference changed"
    assert model.active_adapter == "default" and policy.training
    assert all(p.requires_grad == flag for p, flag in flags)  # peft's set_adapter changes them: put back
    assert not any(p.requires_grad for n, p in model.named_parameters() if f".{REWARD_ADAPTER}." in n)
    assert not any(p.requires_grad for p in reward.head.parameters())

    # A response that stopped at its own EOS is scored at that EOS, as training scored it: no second one is appended.
    eos_id = tok.eos_token_id
    ended, ended_mask = left_pad([tok("So I saw it", add_special_tokens=False)["input_ids"] + [eos_id]] * 2, 0, "cpu")
    ended_scores = reward.score_tokens(["So I saw it"] * 2, ended, ended_mask).scores
    assert torch.allclose(ended_scores, scores[:1].expand(2), atol=1e-5), (ended_scores, scores)

    # Text-only callers get the same scores: the texts re-tokenized with the same tokenizer are the same ids.
    assert torch.allclose(reward(["So I saw it", "It was"]).scores, scores, atol=1e-5)

    # The update's gradients reach the policy adapter and value head only.
    out = policy.score(ids, mask, 2)
    (out.logprobs.sum() + out.values.sum()).backward()
    assert all(p.grad is None for n, p in model.named_parameters() if f".{REWARD_ADAPTER}." in n)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)

    # The scores are those of the reward model alone: the merged model with only the reward adapter.
    from peft import PeftModel

    alone = modeling.load_base(ModelConfig(name=str(merged), quantization="8bit", dtype="float32"), merged)
    alone = PeftModel.from_pretrained(alone, reward_run / "reward/adapter").eval()
    head = load_score_head(reward_run / "reward/adapter", torch.device("cpu"))
    eos = torch.full_like(ids[:, :1], tok.eos_token_id)
    with torch.no_grad():
        expected = sequence_scores(alone, head, torch.cat([ids, eos], 1), torch.cat([mask, torch.ones_like(eos)], 1))
    assert torch.allclose(scores, expected, atol=1e-5)
    with torch.no_grad():  # and not the policy's: the switch really happened
        policy_scores = sequence_scores(
            model, head, torch.cat([ids, eos], 1), torch.cat([mask, torch.ones_like(eos)], 1)
        )
    assert (policy_scores - expected).abs().max() > 1e-3


def test_ppo_runs_on_the_learned_reward_with_a_judge(reward_run, copy_run):
    run = copy_run(reward_run)
    assert load_spec(str(run / "reward")).type == "adapter"
    small = ["ppo.batch_size=16", "ppo.mini_batch_size=8", "ppo.rollout_batch_size=16", "ppo.ppo_epochs=1",
             "ppo.eval_prompts=8", "ppo.max_steps=1"]  # fmt: skip
    code = cli("ppo", "--recipe", "quickstart", "--run", run, "--reward", run / "reward",
               "reward.judge=quickstart-sentiment", *small)  # fmt: skip
    assert code == 0
    ev = json.loads((run / "ppo/eval.json").read_text())
    assert 0.0 <= ev["positive_rate_before"] <= 1.0 and math.isfinite(ev["reward_after"])
    row = read_jsonl(run / "ppo/metrics.jsonl")[0]
    assert math.isfinite(row["reward_mean"]) and row["reward_std"] > 0
    assert "judge: quickstart-sentiment" in (run / "recipe.yaml").read_text()
    # The policy's adapter directory holds the policy's adapter alone, not the reward's beside it.
    assert sorted(p.name for p in (run / "ppo/adapter").iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "value_head.safetensors",
    ]  # fmt: skip


def length_score(texts: list[str]) -> list[float]:
    """A callable reward for the judge test: longer is better."""
    return [float(len(t)) for t in texts]


def test_a_judge_decides_positive_and_the_reward_the_score(fixture_paths, tmp_path):
    from rlhf.rewards import Judged, Samples, load_reward, score_samples

    spec = tmp_path / "length.yaml"
    spec.write_text("name: length\ntype: callable\ncallable: test_reward:length_score\n")
    judged = Judged(load_reward(str(spec)), load_reward("quickstart-sentiment"))
    texts = ["What a wonderful film, a delight.", "Awful. Avoid it."]
    out = judged(texts)
    assert out.scores.tolist() == [float(len(t)) for t in texts]
    assert out.positive.tolist() == [True, False]  # the classifier's verdict, not score > 0 (both scores are > 0)
    ids = torch.zeros(2, 3, dtype=torch.long)  # a reward without score_tokens scores the texts
    samples = Samples(texts, ["", ""], texts, [[], []], input_ids=ids, attention_mask=torch.ones_like(ids))
    assert score_samples(judged, samples).positive.tolist() == [True, False]
