"""Every bad input is answered by one line on stderr that names the problem and the fix, exit code 2 (3: out of
memory), no traceback, and nothing on disk changed. Also: damaged checkpoints, a full disk, non-finite batches.

The function-level checks live beside their modules (test_configs, test_sft, test_ppo, test_merge); these go through
the command line, as a user meets them.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import cli

from rlhf.config import load_recipe
from rlhf.io import read_jsonl
from rlhf.runs import Run, runs_root

# Small PPO settings: two mini-batches per step, a few held-out prompts.
PPO_SMALL = ["ppo.batch_size=8", "ppo.mini_batch_size=4", "ppo.rollout_batch_size=8", "ppo.ppo_epochs=1",
             "ppo.eval_prompts=4", "ppo.save_steps=1"]  # fmt: skip


class _CurrentStderr:
    """Writes to whatever sys.stderr is at the time of writing."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


@pytest.fixture(autouse=True)
def _library_logs_follow_capture():
    """Libraries bind log handlers to the sys.stderr of the test that imported them; once that test's capture is
    closed, their next warning prints a logging traceback that is no rlhf traceback. Make them follow sys.stderr."""
    known = logging.root.manager.loggerDict.values()
    loggers = [logging.getLogger(), *(v for v in known if isinstance(v, logging.Logger))]
    for logger in loggers:
        for handler in logger.handlers:
            if type(handler) is logging.StreamHandler and handler.stream not in (sys.__stderr__, sys.__stdout__):
                handler.stream = _CurrentStderr()  # not setStream(): it flushes the old, maybe closed, stream


def one_error(capsys, *args, code: int = 2, prefix: str = "rlhf: error:") -> str:
    """Run the CLI, expect `code`, and return the single error line (libraries may print progress bars besides)."""
    assert cli(*args) == code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(("rlhf: error:", "rlhf: does not fit:"))]
    assert len(lines) == 1, err
    assert lines[0].startswith(prefix), err
    assert "Traceback" not in err
    return lines[0]


def tree(path: Path) -> dict[str, str]:
    """Every file under `path` with a hash of its bytes: what 'nothing on disk changed' compares."""
    if not path.exists():
        return {}
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def latest() -> str | None:
    link = runs_root() / "latest"
    return os.readlink(link) if link.is_symlink() else None


@pytest.fixture
def untouched(tmp_path):
    """Asserts, after the test, that the runs/latest pointer did not move."""
    before = latest()
    yield
    assert latest() == before, "a refused command must not move runs/latest"


# --- the recipe and the command line ----------------------------------------------------------------------------


def test_malformed_recipe_file_names_its_line(tmp_path, capsys, untouched):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name: fixture:tiny-gpt-neox\nlora:\n  rank: [16\n")
    line = one_error(capsys, "sft", "--recipe", bad, "--run", tmp_path / "R")
    assert str(bad) in line and "line 5" in line and "malformed YAML" in line
    assert not (tmp_path / "R").exists()


def test_unknown_key_in_recipe_file_lists_valid_keys(tmp_path, capsys, untouched):
    bad = tmp_path / "typo.yaml"
    bad.write_text("model:\n  name: fixture:tiny-gpt-neox\nsft:\n  learnig_rate: 1.0e-4\n")
    line = one_error(capsys, "sft", "--recipe", bad, "--run", tmp_path / "R")
    assert "'sft.learnig_rate'" in line and "learning_rate" in line and "block_size" in line
    assert not (tmp_path / "R").exists()


def test_wrong_type_in_recipe_file(tmp_path, capsys):
    bad = tmp_path / "type.yaml"
    bad.write_text("model:\n  name: fixture:tiny-gpt-neox\nsft:\n  batch_size: big\n")
    line = one_error(capsys, "sft", "--recipe", bad, "--run", tmp_path / "R")
    assert "'sft.batch_size'" in line and "'big'" in line and "integer" in line


@pytest.mark.parametrize(
    "overrides, fragments",
    [
        (["lora.rank=0"], ["'lora.rank' is 0", "greater than or equal to 1"]),
        (["sft.learning_rate=-1e-4"], ["'sft.learning_rate'", "greater than 0"]),
        (["ppo.learning_rate=-1"], ["'ppo.learning_rate'", "greater than 0"]),
        (["ppo.mini_batch_size=128"], ["mini_batch_size (128) must be <= batch_size (64)"]),
        (["ppo.batch_size=10", "ppo.mini_batch_size=4"], ["batch_size (10) must be exactly divisible by"]),
        (["ppo.mini_batch_size=8", "ppo.gradient_accumulation_steps=3"], ["gradient_accumulation_steps (3)"]),
        (["ppo.generation.top_p=0"], ["'ppo.generation.top_p'"]),
        # Truncated sampling would be scored under the full distribution: refused with the reason.
        (["ppo.generation.top_p=0.9"], ["top_p (0.9) 1.0", "full distribution"]),
        (["ppo.generation.top_k=50"], ["top_k (50) must be 0", "full distribution"]),
        # Dropout in PPO's train-mode scoring passes would make old log-probs and the reference random.
        (["ppo.lora.dropout=0.1"], ["lora.dropout (0.1) must be 0", "random"]),
        (["lora.dropout=1.5"], ["'lora.dropout'", "less than 1"]),
    ],
)
def test_out_of_range_values(tmp_path, capsys, untouched, overrides, fragments):
    line = one_error(capsys, "sft", "--recipe", "quickstart", "--run", tmp_path / "R", *overrides)
    for fragment in fragments:
        assert fragment in line
    assert not (tmp_path / "R").exists()


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["sft", "--recipe", "no-such-recipe"], ["no recipe 'no-such-recipe'", "quickstart", "gpt-neox-20b"]),
        (["sft", "--model", "gpt-neox-21b"], ["gpt-neox-21b", "not a recipe alias", "quickstart", "local model"]),
        (["sft", "--recipe", "quickstart", "lora.rank"], ["'lora.rank'", "KEY=VALUE"]),
        # Overrides after a flag are read too (plain argparse would call them unrecognized).
        (["sft", "--recipe", "quickstart", "lora.rank=8", "--force", "lora.rnak=8"], ["'lora.rnak'", "rank"]),
        (["sft", "--recipe", "quickstart", "lora.rank.x=1"], ["'lora.rank' is a value, not a section"]),
        (["sft", "--recipe", "quickstart", "model.name="], ["'model.name' is ''"]),
        (["sft", "--recipe", "quickstart", "--gpu", "banana"], ["--gpu 'banana'", "rtx4090", "24GiB"]),
        (["budget", "--recipe", "quickstart", "--gpu", "0GiB"], ["--gpu '0GiB'"]),
        (["preview", "--recipe", "quickstart", "-n", "-1"], ["-n", "at least 1"]),
        (["preview", "--recipe", "quickstart", "-n", "0"], ["-n", "at least 1"]),
        (["preview", "--recipe", "quickstart", "-n", "two"], ["-n", "'two' is not a whole number"]),
        (["sft", "--model", "recipes/quickstart.yaml"], ["--recipe recipes/quickstart.yaml"]),
        (["merge", "--weights", "1"], ["--adapters"]),
        (["ppo", "--resume", "--run", "/nonexistent/run"], ["does not exist", "rlhf sft --run"]),
    ],
)
def test_command_line_mistakes(tmp_path, capsys, untouched, args, fragments):
    line = one_error(capsys, *args)
    for fragment in fragments:
        assert fragment in line, line


def test_empty_recipe_file(tmp_path, capsys):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    line = one_error(capsys, "sft", "--recipe", empty, "--run", tmp_path / "R")
    assert "is empty" in line and "quickstart" in line


def test_recipe_that_is_not_text(tmp_path, capsys):
    bad = tmp_path / "recipe.yaml"
    bad.write_bytes(b"\xff\xfe\x00binary\x80")
    assert "not a text file" in one_error(capsys, "sft", "--recipe", bad, "--run", tmp_path / "R")


def test_recipe_that_is_a_list(tmp_path, capsys):
    bad = tmp_path / "list.yaml"
    bad.write_text("- model\n- lora\n")
    assert "must be a mapping" in one_error(capsys, "sft", "--recipe", bad, "--run", tmp_path / "R")


@pytest.mark.parametrize("command", ["sft", "merge", "ppo"])
def test_run_that_is_a_file(tmp_path, capsys, command):
    afile = tmp_path / "notes.txt"
    afile.write_text("my notes\n")
    extra = ["--recipe", "quickstart"] if command == "sft" else []
    line = one_error(capsys, command, "--run", afile, *extra)
    assert "is a file" in line
    assert afile.read_text() == "my notes\n"


# --- models and data --------------------------------------------------------------------------------------------


def test_hub_model_while_offline_says_so(tmp_path, capsys, untouched):
    line = one_error(capsys, "sft", "--model", "someorg/some-model", "--run", tmp_path / "R")
    # The tokenizer (read first, to size the data) or the budget's config look-up names it: either says offline/hub
    # and offers a local directory.
    assert "someorg/some-model" in line and "hub" in line and "local" in line and "directory" in line
    assert not (tmp_path / "R").exists()


def test_shipped_hub_model_while_offline_says_so(tmp_path, capsys, untouched, fixture_paths):
    # pythia-160m's config ships with rlhf, so the budget passes; its weights cannot be fetched offline.
    line = one_error(capsys, "sft", "--model", "EleutherAI/pythia-160m", "--run", tmp_path / "R")
    assert "EleutherAI/pythia-160m" in line and "offline" in line and "local directory" in line
    assert not (tmp_path / "R").exists()


def test_model_dir_without_config(tmp_path, capsys):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.safetensors").write_bytes(b"")
    line = one_error(capsys, "sft", "--recipe", "quickstart", "--model", tmp_path / "model", "--run", tmp_path / "R")
    assert "no config.json" in line and "save_pretrained" in line


@pytest.mark.parametrize("weights", [None, "pytorch_model.bin"])
def test_model_dir_without_safetensors_weights(tmp_path, capsys, fixture_paths, weights):
    """A directory with a config but no safetensors is named as such (exit 2), before the budget could size it."""
    model = tmp_path / "model"
    model.mkdir()
    shutil.copy(fixture_paths.policy / "config.json", model / "config.json")
    if weights:
        (model / weights).write_bytes(b"not a pickle to load")
    assert cli("sft", "--recipe", "quickstart", "--model", model, "--run", tmp_path / "R") == 2
    out, err = capsys.readouterr()
    [line] = [line for line in err.splitlines() if line.startswith("rlhf: error:")]
    assert str(model) in line and "Traceback" not in err
    assert ("no weights" in line) if weights is None else ("pickled weights" in line and "safetensors" in line)
    assert "memory budget" not in out, "refused before the budget, which would size the config alone"
    assert not (tmp_path / "R").exists()


def test_hub_dataset_while_offline_says_so(tmp_path, capsys, fixture_paths):
    line = one_error(capsys, "sft", "--recipe", "quickstart", "--dataset", "someorg/reviews", "--run", tmp_path / "R")
    assert "someorg/reviews" in line and "offline" in line and "local" in line


def test_missing_dataset_path(tmp_path, capsys, fixture_paths):
    line = one_error(
        capsys, "sft", "--recipe", "quickstart", "--dataset", tmp_path / "reviews.jsonl", "--run", tmp_path / "R"
    )
    assert "does not exist" in line and "reviews.jsonl" in line


def test_dataset_that_is_not_json(tmp_path, capsys, fixture_paths, untouched):
    data = tmp_path / "reviews.jsonl"
    data.write_text('{"text": "a fine film"}\n{"text": "cut off\n')
    line = one_error(capsys, "sft", "--recipe", "quickstart", "--dataset", data, "--run", tmp_path / "R")
    assert "cannot read" in line and "reviews.jsonl" in line and "JSON" in line
    assert not (tmp_path / "R").exists()


def test_dataset_without_text_column_lists_columns(tmp_path, capsys, fixture_paths, untouched):
    data = tmp_path / "reviews.jsonl"
    data.write_text("".join(json.dumps({"review": "a fine film " * 30, "stars": 5}) + "\n" for _ in range(4)))
    line = one_error(capsys, "sft", "--recipe", "quickstart", "--dataset", data, "--run", tmp_path / "R")
    assert "no column 'text'" in line and "review, stars" in line and "data.text_column" in line
    assert not (tmp_path / "R").exists()


def test_dataset_empty_after_filtering(tmp_path, capsys, fixture_paths):
    data = tmp_path / "reviews.jsonl"
    data.write_text("".join(json.dumps({"text": "too short"}) + "\n" for _ in range(4)))
    line = one_error(
        capsys, "sft", "--recipe", "quickstart", "--dataset", data, "--run", tmp_path / "R", "data.min_chars=50"
    )
    assert "empty after filtering" in line and "data.min_chars" in line


def test_lora_targets_not_in_model_list_linear_layers(tmp_path, capsys, fixture_paths, untouched):
    line = one_error(
        capsys, "sft", "--recipe", "quickstart", "--run", tmp_path / "R", "lora.target_modules=[q_proj,v_proj]"
    )
    assert "q_proj" in line and "query_key_value" in line and "dense_4h_to_h" in line
    assert not (tmp_path / "R").exists(), "the model was loaded, but nothing was written"


def test_8bit_without_bitsandbytes(tmp_path, capsys, fixture_paths, monkeypatch, untouched):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    line = one_error(capsys, "sft", "--recipe", "quickstart", "--run", tmp_path / "R")
    assert "model.quantization=8bit needs bitsandbytes" in line and "model.quantization=none" in line
    assert not (tmp_path / "R").exists()


# --- the order of steps and the run directory -------------------------------------------------------------------


def test_merge_before_sft(tmp_path, capsys):
    run = Run(tmp_path / "R")
    run.write_recipe(load_recipe("quickstart"))
    line = one_error(capsys, "merge", "--run", run.root)
    assert "no SFT adapter" in line and "rlhf sft" in line
    assert not run.merged.exists()


def test_merge_adapter_of_another_base(sft_run, copy_run, capsys):
    run = copy_run(sft_run)
    config_path = run / "sft/adapter/adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = "EleutherAI/pythia-160m"
    config_path.write_text(json.dumps(config))
    line = one_error(capsys, "merge", "--run", run)
    assert "EleutherAI/pythia-160m" in line and "fixture:tiny-gpt-neox" in line
    assert not (run / "merged").exists()


def test_run_holding_another_recipe(sft_run, copy_run, capsys, untouched):
    run = copy_run(sft_run)
    before = tree(run)
    line = one_error(capsys, "sft", "--recipe", "memorize", "--run", run)
    assert "recipe 'quickstart'" in line and "'memorize'" in line and "--resume" in line and "--force" in line
    assert tree(run) == before


def test_ppo_resume_without_checkpoint(merged_run, copy_run, capsys):
    run = copy_run(merged_run)
    before = tree(run)
    line = one_error(capsys, "ppo", "--run", run, "--resume")
    assert "no PPO checkpoint" in line and "without --resume" in line
    assert tree(run) == before


def test_reward_spec_typo_lists_reward_keys(merged_run, copy_run, tmp_path, capsys):
    run = copy_run(merged_run)
    spec = tmp_path / "mine.yaml"
    spec.write_text("name: mine\nmodle: fixture:tiny-distilbert-imdb\n")
    before = tree(run)
    line = one_error(capsys, "ppo", "--run", run, "--reward", spec)
    assert "'modle'" in line and "model" in line and "label" in line and "callable" in line
    assert "sft" not in line.split("valid keys")[-1], "the keys of a reward spec, not of a recipe"
    assert tree(run) == before


def test_reward_label_not_in_classifier(merged_run, copy_run, tmp_path, capsys, fixture_paths):
    run = copy_run(merged_run)
    spec = tmp_path / "happy.yaml"
    spec.write_text("name: happy\nmodel: fixture:tiny-distilbert-imdb\nlabel: HAPPY\n")
    before = tree(run)
    line = one_error(capsys, "ppo", "--run", run, "--reward", spec, *PPO_SMALL)
    assert "HAPPY" in line and "NEGATIVE, POSITIVE" in line
    assert tree(run) == before, "the reward is loaded before recipe.yaml is rewritten"


def test_8bit_optimizer_without_bitsandbytes(merged_run, copy_run, capsys, monkeypatch):
    run = copy_run(merged_run)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    line = one_error(capsys, "ppo", "--run", run, "ppo.optimizer=adam_8bit")
    assert "ppo.optimizer=adam_8bit needs bitsandbytes" in line and "ppo.optimizer=adam" in line


# --- checkpoints: damaged, disk full ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ppo_two_steps(merged_run, tmp_path_factory) -> Path:
    """A PPO run of two steps with a checkpoint after each (step-1, step-2)."""
    import shutil

    run = tmp_path_factory.mktemp("ppo") / "run"
    shutil.copytree(merged_run, run)
    assert cli("ppo", "--run", run, *PPO_SMALL, "ppo.max_steps=2") == 0
    return run


def test_truncated_checkpoint_falls_back_to_the_previous(ppo_two_steps, copy_run, capsys):
    run = copy_run(ppo_two_steps)
    import shutil

    shutil.copytree(ppo_two_steps / "ppo/checkpoints", run / "ppo/checkpoints")
    damaged = run / "ppo/checkpoints/step-2/adapter.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:100])
    partial = run / "ppo/checkpoints/.step-3.x1y2z3.tmp"  # what a save killed half-way leaves behind
    partial.mkdir()
    (partial / "adapter.safetensors").write_bytes(b"\0" * 10)
    assert cli("ppo", "--run", run, "--resume", *PPO_SMALL, "ppo.max_steps=3") == 0
    err = capsys.readouterr().err
    assert "checkpoint step-2 is unreadable" in err and "resumed at step 1" in err
    assert [r["step"] for r in read_jsonl(run / "ppo/metrics.jsonl")] == [1, 2, 3]
    assert not partial.exists()


def test_resume_killed_before_its_first_checkpoint_starts_over(ppo_two_steps, copy_run, capsys):
    run = copy_run(ppo_two_steps)  # metrics and the evaluation before training, but no checkpoint
    assert read_jsonl(run / "ppo/metrics.jsonl") and not (run / "ppo/checkpoints").exists()
    assert cli("ppo", "--run", run, "--resume", *PPO_SMALL, "ppo.max_steps=2") == 0
    assert "no checkpoint" in capsys.readouterr().err
    assert [r["step"] for r in read_jsonl(run / "ppo/metrics.jsonl")] == [1, 2], "each step once"
    assert (run / "ppo/checkpoints/step-2").is_dir()


def test_disk_full_during_checkpoint_keeps_the_previous(ppo_two_steps, copy_run, capsys, monkeypatch):
    import shutil

    from rlhf.rl import checkpoint

    run = copy_run(ppo_two_steps)
    shutil.copytree(ppo_two_steps / "ppo/checkpoints", run / "ppo/checkpoints")
    previous = tree(run / "ppo/checkpoints/step-2")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(args[1]) if len(args) > 1 else None)

    monkeypatch.setattr(checkpoint, "save_file", full)
    line = one_error(capsys, "ppo", "--run", run, "--resume", *PPO_SMALL, "ppo.max_steps=3")
    assert "disk full" in line and "--resume" in line
    checkpoints = run / "ppo/checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-1", "step-2"], "no half-written step-3"
    assert tree(checkpoints / "step-2") == previous


# --- non-finite batches -----------------------------------------------------------------------------------------

NAN_REWARD = '''
import math

calls = 0


def score(texts):
    """Rewards by length; NaN for the calls listed in BAD (1: the evaluation before training, 2: step 1, ...)."""
    global calls
    calls += 1
    bad = calls in BAD or (FROM is not None and calls >= FROM)
    return [math.nan if bad else len(t) / 100 for t in texts]
'''


def _nan_reward(tmp_path, monkeypatch, name: str, bad: set[int], start: int | None = None) -> Path:
    (tmp_path / f"{name}.py").write_text(NAN_REWARD + f"\nBAD = {bad!r}\nFROM = {start!r}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    spec = tmp_path / f"{name}.yaml"
    spec.write_text(f"name: {name}\ntype: callable\ncallable: {name}:score\n")
    return spec


def test_nonfinite_reward_and_loss_skip_the_batch(merged_run, copy_run, tmp_path, capsys, monkeypatch):
    from rlhf.ppo import update

    run = copy_run(merged_run)
    spec = _nan_reward(tmp_path, monkeypatch, "nan_once", bad={2})  # step 1's first rollout
    policy_loss, calls = update.policy_loss, []

    def nan_loss(*args, **kwargs):
        # Step 1 takes 2 mini-batches (calls 1-2); both mini-batches of step 2's first attempt (3-4) are NaN.
        calls.append(1)
        loss, stats = policy_loss(*args, **kwargs)
        return (loss * float("nan"), stats) if len(calls) in (3, 4) else (loss, stats)

    monkeypatch.setattr(update, "policy_loss", nan_loss)
    assert cli("ppo", "--run", run, "--reward", spec, *PPO_SMALL, "ppo.max_steps=2", "ppo.score_norm=true") == 0
    err = capsys.readouterr().err
    assert "non-finite reward or log-probs at step 1; batch skipped" in err
    assert "non-finite loss or gradient at step 2; batch skipped" in err
    rows = read_jsonl(run / "ppo/metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert [r["nonfinite_skipped"] for r in rows] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["policy_loss"])) for r in rows)
    # The running score statistics hold the two steps that trained (2 x 8 scores), not the skipped batch's.
    state = json.loads((run / "ppo/checkpoints/step-2/state.json").read_text())
    assert state["score_transform"]["moments"]["count"] == 16


def test_nonfinite_in_a_row_stops_with_the_last_good_checkpoint(merged_run, copy_run, tmp_path, capsys, monkeypatch):
    run = copy_run(merged_run)
    spec = _nan_reward(tmp_path, monkeypatch, "nan_after", bad=set(), start=3)  # step 1 is fine, then only NaN
    line = one_error(
        capsys, "ppo", "--run", run, "--reward", spec, *PPO_SMALL, "ppo.max_steps=3", "ppo.nonfinite_patience=2", code=1
    )
    assert "2 batches in a row had a non-finite reward" in line and "stopped at step 1" in line
    assert "step-1" in line and "Likely causes" in line and "reward" in line
    assert [r["step"] for r in read_jsonl(run / "ppo/metrics.jsonl")] == [1]
    assert [p.name for p in (run / "ppo/checkpoints").iterdir()] == ["step-1"]
    assert not (run / "ppo/adapter").exists(), "no final adapter from a run that stopped"


# --- out of memory ----------------------------------------------------------------------------------------------


def _oom(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_sft_out_of_memory_prints_the_budget(tmp_path, capsys, fixture_paths, monkeypatch):
    from transformers import Trainer

    monkeypatch.setattr(Trainer, "train", _oom)
    assert cli("sft", "--recipe", "quickstart", "--run", tmp_path / "R") == 3
    out, err = capsys.readouterr()
    assert "3/4 of the predicted peak" in out and "cheapest changes" in out and "sft.batch_size" in out
    lines = [line for line in err.splitlines() if line.startswith("rlhf: ")]
    assert len(lines) == 1 and "sft ran out of GPU memory" in lines[0] and "--auto-fit" in lines[0]
    assert "Traceback" not in err


def test_sft_out_of_memory_with_auto_fit_retries_with_half_the_batch(tmp_path, capsys, fixture_paths, monkeypatch):
    from transformers import Trainer

    train, seen = Trainer.train, []

    def oom_once(self, *args, **kwargs):
        seen.append((self.args.per_device_train_batch_size, self.args.gradient_accumulation_steps))
        if len(seen) == 1:
            _oom()
        return train(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train", oom_once)
    run = tmp_path / "R"
    assert cli("sft", "--recipe", "quickstart", "--run", run, "--auto-fit", "sft.max_steps=1") == 0
    assert seen == [(8, 1), (4, 2)], "one retry, with half the micro-batch and the same effective batch"
    assert "retrying once with sft.batch_size=4 sft.gradient_accumulation_steps=2" in capsys.readouterr().err
    assert Run(run).load_recipe().sft.batch_size == 4
    assert (run / "sft/adapter/adapter_model.safetensors").is_file()


def test_ppo_out_of_memory_with_auto_fit(tmp_path, capsys, fixture_paths, monkeypatch):
    from rlhf.ppo import step

    run = Run(tmp_path / "R")
    run.write_recipe(load_recipe("quickstart"))
    seen = []

    def run_oom(recipe, *args, **kwargs):
        seen.append(recipe.ppo)
        _oom()

    monkeypatch.setattr(step, "run", run_oom)
    line = one_error(capsys, "ppo", "--run", run.root, "--auto-fit", code=3, prefix="rlhf: does not fit:")
    assert "ppo ran out of GPU memory" in line and "--auto-fit" not in line
    assert len(seen) == 2, "exactly one retry"
    first, second = seen
    assert second.mini_batch_size == first.mini_batch_size, "the mini-batch (the update) stays"
    assert (
        second.mini_batch_size // second.gradient_accumulation_steps
        == (first.mini_batch_size // first.gradient_accumulation_steps) // 2
    )
    assert second.rollout_batch_size == first.rollout_batch_size // 2


def test_ppo_out_of_memory_prints_the_budget(tmp_path, capsys, fixture_paths, monkeypatch):
    from rlhf.ppo import step

    run = Run(tmp_path / "R")
    run.write_recipe(load_recipe("quickstart"))
    monkeypatch.setattr(step, "run", _oom)
    assert cli("ppo", "--run", run.root) == 3
    out, err = capsys.readouterr()
    assert "memory budget: ppo" in out and "3/4 of the predicted peak" in out and "cheapest changes" in out
    assert "ppo ran out of GPU memory" in err and "--auto-fit" in err and "Traceback" not in err
