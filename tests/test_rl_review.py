"""The shared RL layer's contracts that the review found broken: held-out prompts, resume, rollback, checkpoints."""

from __future__ import annotations

import io
import json

import pytest

from rlhf import modeling
from rlhf.config import DataConfig, load_recipe
from rlhf.data import load_texts
from rlhf.errors import UserError
from rlhf.ppo.trainer import PPOTrainer
from rlhf.rl.parallel import Parallel
from rlhf.rl.step import check_resume_settings
from rlhf.runs import Run


def test_without_a_test_split_evaluation_prompts_are_never_drawn_in_training(tmp_path, fixture_paths):
    """With no eval split, the tail of train is the evaluation set: training must never draw from it, and the log
    says how many documents were held out."""
    texts = load_texts(DataConfig(dataset="fixture:imdb"), "train", min_chars=200)[:40]
    data = tmp_path / "train_only.jsonl"
    # The first row repeats a held-out document: training must not draw that copy either.
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in [texts[-1], *texts]))
    # Whole documents as prompts (no truncation), so the pool's token lists identify documents.
    recipe = load_recipe("quickstart", [f"data.dataset={data}", "ppo.eval_prompts=8", "ppo.prompt_max_tokens=100000"])
    out = io.StringIO()
    trainer = PPOTrainer(recipe, Run(tmp_path / "run"), "quickstart-sentiment", Parallel(), out=out)
    trainer.tokenizer = modeling.load_tokenizer(fixture_paths.policy)
    trainer._setup_data()

    held_out = {tuple(ids) for ids in trainer.eval_prompts.tokens}
    pool = {tuple(ids) for ids in trainer.prompts.tokens}
    assert len(trainer.eval_texts) == 8 and len(held_out) == 8
    assert not held_out & pool, "training can draw evaluation prompts"
    assert trainer.held_out_of_train == 8 and trainer.eval_source == "train (last 8, held out of training)"
    assert "the last 8 'train' documents are held out for evaluation; training draws from the other 32" in (
        out.getvalue()
    )
    # Here eval_prompts decides which documents training draws: a resume may not change it silently.
    saved = {**trainer.settings(), "held_out_of_train": 16}
    with pytest.raises(UserError, match="held_out_of_train: 16 -> 8"):
        check_resume_settings(trainer, {"settings": saved}, force=False)
    # Each rank's prompts depend on the number of processes: a resume on another number is refused too.
    saved = {**trainer.settings(), "world_size": 2}
    with pytest.raises(UserError, match="world_size: 2 -> 1"):
        check_resume_settings(trainer, {"settings": saved}, force=False)


def test_a_save_killed_between_its_renames_keeps_the_previous_adapter(tmp_path, monkeypatch):
    """atomic_dir replaces a directory in two renames (old aside, new in) and promises that a crash in between leaves
    the previous complete version: the clean-up before a resume must put it back, not delete it."""
    import os

    from rlhf import io as rlhf_io
    from rlhf.io import atomic_dir
    from rlhf.rl import checkpoint

    step_dir, checkpoints = tmp_path / "ppo", tmp_path / "ppo" / "checkpoints"
    adapter = step_dir / "adapter"
    with atomic_dir(adapter) as tmp:
        (tmp / "adapter_model.safetensors").write_text("step 2")
    with atomic_dir(checkpoints / "step-2") as tmp:
        (tmp / "state.json").write_text("{}")

    renames, replace = [], os.replace

    def killed_after_the_first_rename(src, dst):
        renames.append(dst)
        if len(renames) == 2:
            raise KeyboardInterrupt
        replace(src, dst)

    monkeypatch.setattr(rlhf_io.os, "replace", killed_after_the_first_rename)
    with pytest.raises(KeyboardInterrupt), atomic_dir(adapter) as tmp:
        (tmp / "adapter_model.safetensors").write_text("step 4")
    monkeypatch.undo()
    assert not adapter.exists() and len(list(step_dir.glob(".adapter.old-*"))) == 1
    (checkpoints / ".step-4.abc123.tmp").mkdir()  # a checkpoint save killed half-way
    (step_dir / ".adapter.def456.tmp").mkdir()

    checkpoint.remove_partial(checkpoints, adapter)
    assert (adapter / "adapter_model.safetensors").read_text() == "step 2", "the previous complete version is back"
    assert sorted(p.name for p in step_dir.iterdir()) == ["adapter", "checkpoints"]
    assert [p.name for p in checkpoints.iterdir()] == ["step-2"]
