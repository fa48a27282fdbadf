"""What the two steps trained on preference pairs (`rlhf reward`, `rlhf dpo`) do alike before their first step: check
the run and the resume, the budget pre-flight, setup, and only then change the run directory."""

from __future__ import annotations

import os
import shutil
import sys

from rlhf import modeling
from rlhf.config import Recipe
from rlhf.errors import UserError
from rlhf.io import trim_jsonl
from rlhf.rl import checkpoint
from rlhf.runs import Run, merged_run_recipe

# eval_before.json too: a run killed after its first evaluation and before its first step can be resumed.
OUTPUTS = ("metrics.jsonl", "checkpoints", "eval.json", "eval_before.json")


def prepare(recipe: Recipe, run: Run, step: str, section: str, what: str, resume: bool, force: bool) -> Recipe:
    """The run's recipe with this step's `section` (and the budget) from the recipe given; a finished run of the step
    needs --resume or --force."""
    trained = merged_run_recipe(run, recipe)
    directory = run.root / step
    has_run = any((directory / name).exists() for name in OUTPUTS)
    if resume and not has_run:
        raise UserError(f"--resume: no {what} training in {directory}; run without --resume")
    if has_run and not resume and not force:
        raise UserError(
            f"{run.root} already holds a {what} run; pass --resume to continue it, --force to train it again, or use "
            f"another --run"
        )
    # The step takes its own section from the recipe given; model, LoRA, data, SFT and the other steps stay as they
    # were.
    return trained.model_copy(update={section: getattr(recipe, section), "budget": recipe.budget})


def check_resume_settings(trainer, state: dict, force: bool, section: str, what: str) -> None:
    """A resume keeps the settings it was started with (the linear schedule's length among them), unless --force."""
    saved = state.get("settings")
    if saved is None or force:
        return
    current = trainer.settings()
    changes = checkpoint.changed_settings(saved[section], current[section], section)
    if saved.get("total_steps") != current["total_steps"] and trainer.cfg.lr_scheduler == "linear":
        changes.append(f"total steps (the linear schedule): {saved.get('total_steps')} -> {current['total_steps']}")
    if changes:
        raise UserError(
            f"--resume would change {what}'s settings ({'; '.join(changes)}); resume with the settings it was started "
            f"with, or pass --force to continue with the new ones"
        )


def start(
    trainer_cls,
    recipe: Recipe,
    run: Run,
    step: str,
    section: str,
    what: str,
    resume: bool,
    force: bool,
    gpu: str | None,
):
    """(recipe, trainer set up) for a pair-trained step, the run directory cleared or trimmed for it."""
    from rlhf import budget

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError(f"rlhf {step} runs in one process; start it without accelerate launch / torchrun")
    recipe = prepare(recipe, run, step, section, what, resume, force)
    cfg = getattr(recipe, section)
    if cfg.optimizer == "adamw_8bit":
        modeling.require_bitsandbytes(f"{section}.optimizer=adamw_8bit", f"{section}.optimizer=adamw")
    budget.preflight(recipe, step, gpu=gpu, force=force)
    directory = run.root / step
    checkpoints = directory / "checkpoints"
    if resume and not checkpoint.saved_steps(checkpoints):
        resume = False
        print(f"{step}: warning: no checkpoint in {checkpoints} yet; starting from step 0", file=sys.stderr)

    trainer = trainer_cls(recipe, run)
    trainer.setup()
    if resume:
        check_resume_settings(trainer, trainer.load_checkpoint(), force, section, what)
    # Only now, with the data, model and checkpoint known to work, does the run directory change.
    run.write_recipe(recipe, step)
    if not resume:
        shutil.rmtree(checkpoints, ignore_errors=True)
        for name in ("metrics.jsonl", "eval.json", "eval_before.json"):
            (directory / name).unlink(missing_ok=True)
    else:
        trim_jsonl(trainer.log.metrics_path, trainer.step)
        print(f"{step}: resumed at step {trainer.step}", file=sys.stderr)
    print(f"{step}: {trainer.preferences.summary()}", file=sys.stderr)
    for warning in trainer.preferences.warnings:
        print(f"{step}: warning: {warning}", file=sys.stderr)
    return recipe, trainer
