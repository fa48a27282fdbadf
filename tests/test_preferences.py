"""Preference pairs as TRL defines them (`rlhf.preferences`): explicit and implicit prompts, chat messages rendered
with the template, the join checked and tokenized as TRL does, the held-out pairs counted and said, and bad files
named by the setting that points at them."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from rlhf import modeling
from rlhf.config import RewardModelConfig
from rlhf.errors import UserError
from rlhf.preferences import Pair, encode, load_preferences
from rlhf.reward_model.data import load_pairs

# A minimal ChatML-like template: enough for apply_chat_template to render turns and the generation prompt.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer(fixture_paths):
    return modeling.load_tokenizer(fixture_paths.policy)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(path, **kw):
    return RewardModelConfig(dataset=str(path), **kw)


def test_explicit_and_implicit_pairs_give_the_same_triples(tmp_path, tokenizer):
    explicit = [{"prompt": f"Movie {i} was", "chosen": " great fun.", "rejected": " a bore."} for i in range(6)]
    implicit = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in explicit]
    a = load_preferences(_cfg(_write(tmp_path / "a.jsonl", explicit)), "reward_model", tokenizer)
    b = load_preferences(_cfg(_write(tmp_path / "b.jsonl", implicit)), "reward_model", tokenizer)
    assert a.form == "explicit prompt" and b.form.startswith("implicit prompt")
    assert a.train + a.held_out == [Pair(r["prompt"], r["chosen"], r["rejected"]) for r in explicit]
    # TRL's rule: the shared prefix is the prompt, the space before the first differing word goes to the answers.
    assert b.train + b.held_out == a.train + a.held_out
    assert not a.warnings and not b.warnings
    # The reward model reads the same ids either way: before, an implicit pair was trained with an empty prompt.
    ta, ea, _ = load_pairs(_cfg(tmp_path / "a.jsonl", eval_pairs=2), tokenizer)
    tb, eb, _ = load_pairs(_cfg(tmp_path / "b.jsonl", eval_pairs=2), tokenizer)
    assert ta.chosen == tb.chosen and eb.rejected == ea.rejected


def test_chat_pairs_are_rendered_with_the_template_in_both_forms(tmp_path, tokenizer):
    tokenizer.chat_template = CHAT_TEMPLATE
    user = [{"role": "user", "content": "Was the film good?"}]
    answers = [{"role": "assistant", "content": "Yes, wonderful."}], [{"role": "assistant", "content": "No."}]
    explicit = [{"prompt": user, "chosen": answers[0], "rejected": answers[1]}] * 2
    implicit = [{"chosen": user + answers[0], "rejected": user + answers[1]}] * 2
    for rows in (explicit, implicit):
        prefs = load_preferences(_cfg(_write(tmp_path / "c.jsonl", rows)), "reward_model", tokenizer)
        pair = prefs.train[0]
        assert pair.prompt == "<|user|>Was the film good?\n<|assistant|>", pair
        assert (pair.chosen, pair.rejected) == ("Yes, wonderful.\n", "No.\n")
        assert "chat messages" in prefs.form
    tokenizer.chat_template = None
    with pytest.raises(UserError, match="no chat template"):
        load_preferences(_cfg(tmp_path / "c.jsonl"), "reward_model", tokenizer)


def test_encode_joins_as_text_and_cuts_where_the_tokenizations_part(tokenizer):
    pairs = [Pair("It was", " great.", " bad."), Pair("It was gre", "at.", "y.")]
    enc = encode(pairs, tokenizer)
    for pair, p, c, r in zip(pairs, enc.prompt_ids, enc.chosen_ids, enc.rejected_ids):
        assert p + c == tokenizer(pair.prompt + pair.chosen, add_special_tokens=False)["input_ids"]
        assert p + r == tokenizer(pair.prompt + pair.rejected, add_special_tokens=False)["input_ids"]
    # "gre" + "at." merge into other tokens than "gre" alone: that prompt's tail moves into the answers, counted.
    assert enc.n_prompt_cut >= 1 and enc.prompt_ids[0] == tokenizer("It was", add_special_tokens=False)["input_ids"]


def test_suspicious_pairs_are_warned_about(tmp_path, tokenizer):
    rows = [
        {"prompt": "It was", "chosen": "It was great.", "rejected": "It was bad."},  # the prompt twice
        {"prompt": "It was", "chosen": "great.", "rejected": " bad."},  # "It wasgreat."
        {"prompt": "It was", "chosen": " fine.", "rejected": " fine."},  # nothing to prefer
        {"prompt": "It was", "chosen": " good.", "rejected": " poor."},
    ]
    path = _write(tmp_path / "w.jsonl", rows)
    # A pair with nothing to prefer is refused, naming the row and the setting that leaves such pairs out.
    refused = r"split 'train' row 2: chosen and rejected are the same answer \(1 of 4 rows\).*skip_identical_pairs=true"
    with pytest.raises(UserError, match=refused):
        load_preferences(_cfg(path), "reward_model", tokenizer)
    prefs = load_preferences(_cfg(path, skip_identical_pairs=True), "reward_model", tokenizer)
    text = " | ".join(prefs.warnings)
    assert "1 of 4 pairs in split 'train' have completions that begin with their prompt" in text
    assert "1 of 4 pairs in split 'train' join prompt and answer with no space" in text
    assert "1 of 4 pairs in split 'train' have chosen == rejected and are left out" in text
    assert len(prefs.train) + len(prefs.held_out) == 3
    # A two-word prompt that begins one answer of many by chance is no mistake: no warning.
    rows = [{"prompt": f"Film {i}:", "chosen": " good.", "rejected": " bad."} for i in range(40)]
    rows.append({"prompt": "It is", "chosen": " It is one of the best", "rejected": " It is one of the worst"})
    prefs = load_preferences(_cfg(_write(tmp_path / "chance.jsonl", rows)), "reward_model", tokenizer)
    assert not prefs.warnings


def test_held_out_pairs_are_counted_said_and_settable(tmp_path, tokenizer):
    rows = [{"prompt": f"Take {i}:", "chosen": " good.", "rejected": " bad."} for i in range(40)]
    path = _write(tmp_path / "p.jsonl", rows)
    prefs = load_preferences(_cfg(path), "reward_model", tokenizer)
    assert (len(prefs.train), len(prefs.held_out)) == (20, 20)
    assert "20 to train on, 20 held out (the last 20 of 'train', as there is no 'test' split; at most half" in (
        prefs.summary()
    )
    assert "reward_model.eval_pairs sets how many" in prefs.summary()
    prefs = load_preferences(_cfg(path, eval_pairs=5), "dpo", tokenizer)
    assert (len(prefs.train), len(prefs.held_out)) == (35, 5) and "dpo.eval_pairs" in prefs.summary()
    assert prefs.held_out == [Pair(r["prompt"], r["chosen"], r["rejected"]) for r in rows[-5:]]
    # A test split is used as is, its first eval_pairs.
    split = tmp_path / "split"
    split.mkdir()
    _write(split / "train.jsonl", rows[:30])
    _write(split / "test.jsonl", rows[30:])
    prefs = load_preferences(SimpleNamespace(dataset=str(split), eval_pairs=4), "dpo", tokenizer)
    assert (len(prefs.train), len(prefs.held_out)) == (30, 4)
    assert "the first 4 of the 10 in split 'test'" in prefs.summary()


@pytest.mark.parametrize(
    "content, expected",
    [
        ("", "is empty (reward_model.dataset)"),
        ('{"prompt": "a", "chosen": "b"\n', "(reward_model.dataset) as json"),
    ],
    ids=["empty-file", "malformed-json"],
)
def test_a_bad_preference_file_names_the_reward_setting(tmp_path, tokenizer, content, expected):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(UserError, match=r".*") as info:
        load_preferences(_cfg(path), "reward_model", tokenizer)
    message = str(info.value)
    assert expected in message and "data.text_column" not in message, message
