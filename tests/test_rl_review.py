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
