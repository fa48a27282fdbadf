"""`rlhf ppo`: check the run, print the memory budget, train, save the adapter, evaluate before and after.

1. the run must hold a merged model; a finished PPO needs --resume or --force; a resume keeps its settings
2. the budget pre-flight (exit 3 when it does not fit)
3. setup (model, reward, prompts, optimizer); only then does the run directory change
4. evaluate before (once, kept in eval_before.json), train with Ctrl-C -> checkpoint, save the adapter
5. evaluate after; eval.json
"""

from __future__ import annotations

import io
import json
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import save_file

from rlhf import modeling
from rlhf.config import Recipe
from rlhf.diversity import collapse_warning
from rlhf.errors import UserError
from rlhf.io import atomic_dir, atomic_write_json, atomic_write_text, trim_jsonl
from rlhf.ppo.trainer import PPOTrainer
from rlhf.rl import checkpoint
from rlhf.rl.parallel import Parallel
from rlhf.runs import Run

EVAL_KEYS = (
    "reward", "positive_rate", "kl", "distinct_1", "distinct_2", "repetition", "response_perplexity", "perplexity",
)  # fmt: skip


@dataclass
class PpoResult:
    run: Run
    adapter: Path
    steps: int
    eval: dict


def prepare(recipe: Recipe, run: Run, reward: str | None, resume: bool, force: bool) -> tuple[Recipe, str]:
    if not run.recipe_path.is_file():
        raise UserError(f"{run.root} holds no run; run `rlhf sft --run {run.root}` and `rlhf merge` first")
    trained = run.load_recipe()
    if trained.model.name != recipe.model.name:
        raise UserError(
            f"{run.root} was trained from '{trained.model.name}', but the recipe names '{recipe.model.name}'; "
            f"use the run's recipe (omit --recipe) or another --run"
        )
    if not (run.merged / "config.json").is_file():
        raise UserError(f"no merged model in {run.root}; run `rlhf merge --run {run.root}` first")
    # PPO takes its own sections from the recipe given; model, LoRA, data and SFT stay as the run was trained.
    recipe = trained.model_copy(update={"ppo": recipe.ppo, "reward": recipe.reward, "budget": recipe.budget})
    reward_name = reward or recipe.reward.name
    recipe = recipe.model_copy(update={"reward": recipe.reward.model_copy(update={"name": reward_name})})
    has_ppo = (run.ppo_dir / "metrics.jsonl").exists() or run.ppo_checkpoints.exists()
    if has_ppo and not resume and not force:
        raise UserError(
            f"{run.root} already holds a PPO run; pass --resume to continue it, --force to start it again, "
            f"or use another --run"
        )
    if resume and not has_ppo and not (run.ppo_dir / "eval_before.json").exists():
        raise UserError(f"--resume: no PPO checkpoint in {run.ppo_checkpoints}; run without --resume")
    return recipe, reward_name


def check_resume_settings(trainer: PPOTrainer, state: dict, force: bool) -> None:
    """A resume continues the run it was started as: changed settings are refused unless --force."""
    saved = state.get("settings")
    if saved is None or force:
        return
    current = trainer.settings()
    changes = checkpoint.changed_settings(saved["ppo"], current["ppo"], "ppo")
    if saved.get("reward") != current["reward"]:
        changes.append(f"reward: {saved.get('reward')!r} -> {current['reward']!r}")
    if changes:
        raise UserError(
            f"--resume would change the run's settings ({'; '.join(changes)}); resume with the settings it was "
            f"started with, or pass --force to continue with the new ones"
        )


def run(
    recipe: Recipe, run: Run, reward: str | None = None, resume: bool = False, force: bool = False,
    gpu: str | None = None,
) -> PpoResult:  # fmt: skip
    from rlhf import budget
    from rlhf.rewards import load_spec

    parallel = Parallel()
    main = parallel.is_main
    recipe, reward_name = prepare(recipe, run, reward, resume, force)
    load_spec(reward_name)  # an unknown reward fails now, before anything heavy is loaded
    if recipe.ppo.optimizer == "adam_8bit":
        modeling.require_bitsandbytes("ppo.optimizer=adam_8bit", "ppo.optimizer=adam")
    budget.preflight(recipe, "ppo", gpu=gpu, force=force, out=sys.stdout if main else io.StringIO())
    restart = resume and not checkpoint.saved_steps(run.ppo_checkpoints)
    if restart:  # killed before its first checkpoint: there is nothing to continue from but the start
        resume = False
        if main:
            print(
                f"ppo: warning: no checkpoint in {run.ppo_checkpoints} yet; starting PPO from step 0", file=sys.stderr
            )

    trainer = PPOTrainer(recipe, run, reward_name, parallel)
    trainer.setup()
    if resume:
        state = trainer.load_checkpoint()
        check_resume_settings(trainer, state, force)
    # Only now, with the model, reward, data and checkpoint known to work, does the run directory change.
    if main:
        run.write_recipe(recipe)
        if force and not resume and not restart:
            shutil.rmtree(run.ppo_checkpoints, ignore_errors=True)
            for name in ("metrics.jsonl", "samples.jsonl", "eval.json", "eval_before.json"):
                (run.ppo_dir / name).unlink(missing_ok=True)
        trainable, total = modeling.count_parameters(trainer.model)
        print(
            f"ppo: policy LoRA r={recipe.ppo.lora.rank} + value head on {recipe.model.quantization} merged model: "
            f"{trainable:,} trainable of {total:,}; reward: {reward_name}",
            file=sys.stderr,
        )
        if resume or restart:
            trim_jsonl(trainer.log.metrics_path, trainer.step)
            trim_jsonl(trainer.log.samples_path, trainer.step)
            print(f"ppo: resumed at step {trainer.step}", file=sys.stderr)
    parallel.barrier()  # rank 0's deletions and trims are done before any rank writes again

    before_path = run.ppo_dir / "eval_before.json"
    if before_path.is_file():
        before = json.loads(before_path.read_text())
    else:
        before = trainer.evaluate()
        if main:
            atomic_write_json(before_path, before)
    if main and before:
        print(
            f"ppo: before: reward {before['reward']:.3f}, positive rate {before['positive_rate']:.2f}", file=sys.stderr
        )

    def on_sigint(signum, frame):
        # Finish the current step, save a checkpoint and exit 130: Ctrl-C never costs more than one step.
        trainer.stop_requested = True
        if main:
            print("\nppo: interrupted; saving a checkpoint after this step (Ctrl-C again to abort)", file=sys.stderr)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        trainer.train()
    finally:
        signal.signal(signal.SIGINT, previous)
        if hasattr(trainer, "bar"):
            trainer.bar.close()  # on an error too: its message then starts on a line of its own
    if trainer.stop_requested:
        raise KeyboardInterrupt
    parallel.check_in_sync(trainer.params)

    adapter = save_adapter(trainer) if main else run.ppo_adapter
    parallel.barrier()
    after = trainer.evaluate()
    result = {}
    if main and after:
        result = {
            **{f"{k}_{when}": ev[k] for k in EVAL_KEYS for when, ev in (("before", before), ("after", after))},
            "early_stop": trainer.early_stop,
            "n_prompts": len(trainer.eval_texts),
            "eval_split": trainer.eval_source,
            "steps": trainer.step,
            "samples_before": before["samples"],
            "samples_after": after["samples"],
        }
        atomic_write_json(run.ppo_dir / "eval.json", result)
        print(
            f"ppo: done, {trainer.step} steps. reward {result['reward_before']:.3f} -> {result['reward_after']:.3f}, "
            f"positive rate {result['positive_rate_before']:.2f} -> {result['positive_rate_after']:.2f}, "
            f"KL {result['kl_after']:.2f}, perplexity {result['perplexity_before']:.1f} -> "
            f"{result['perplexity_after']:.1f}, distinct-2 {result['distinct_2_before']:.2f} -> "
            f"{result['distinct_2_after']:.2f}; adapter: {adapter}"
        )
        collapsed = collapse_warning(result["distinct_2_before"], result["distinct_2_after"])
        if collapsed:
            print(f"ppo: warning: {collapsed}; see ppo.kl_ceiling, ppo.diversity_floor and ppo.target_kl")
    return PpoResult(run, adapter, trainer.step, result)


def save_adapter(trainer: PPOTrainer) -> Path:
    """RUN/ppo/adapter: a PEFT adapter (its base named by absolute path, so plain peft finds it from anywhere) and
    value_head.safetensors."""
    out = trainer.run.ppo_adapter
    with atomic_dir(out) as tmp:
        trainer.model.save_pretrained(tmp, safe_serialization=True)
        value_head = {k: v.detach().cpu().contiguous() for k, v in trainer.policy.value_head.state_dict().items()}
        save_file(value_head, str(tmp / "value_head.safetensors"))
        targets = modeling.adapter_targets(trainer.model)
        atomic_write_text(
            tmp / "README.md", _card(trainer.recipe, trainer.reward_name, trainer.step, trainer.run, targets)
        )
    return out


def _card(recipe: Recipe, reward: str, steps: int, run: Run, targets: list[str]) -> str:
    return (
        f"# PPO policy adapter (rlhf ppo)\n\n"
        f"- base: {run.merged.resolve()} (the merged SFT model of this run: {recipe.model.name} + SFT adapter)\n"
        f"- reward: {reward}\n"
        f"- LoRA: r={recipe.ppo.lora.rank}, alpha={recipe.ppo.lora.alpha}, "
        f"targets {', '.join(targets)}\n"
        f"- steps: {steps} of batch {recipe.ppo.batch_size}, learning rate {recipe.ppo.learning_rate}\n"
        f"- date: {time.strftime('%Y-%m-%d')}\n\n"
        f"`value_head.safetensors` holds the value head (`summary.weight`, `summary.bias`) trained with the adapter.\n"
        f"Load with `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), this_dir)`.\n"
    )
