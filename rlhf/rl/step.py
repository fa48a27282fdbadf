"""An RL step after merge (`rlhf ppo`, `rlhf grpo`): check the run, print the memory budget, train, save the adapter,
evaluate before and after.

1. the run must hold a merged model; a finished step needs --resume or --force; a resume keeps its settings
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from rlhf import modeling
from rlhf.config import Recipe
from rlhf.diversity import collapse_warning
from rlhf.errors import UserError
from rlhf.io import atomic_dir, atomic_write_json, atomic_write_text, trim_jsonl
from rlhf.rewards import accuracy_reward
from rlhf.rl import checkpoint
from rlhf.rl.parallel import Parallel
from rlhf.rl.trainer import RLTrainer
from rlhf.runs import Run, merged_run_recipe

POLICY_ADAPTER = "default"  # the name `modeling.add_lora` gives the policy's adapter


@dataclass
class StepResult:
    run: Run
    adapter: Path
    steps: int
    eval: dict


def prepare(recipe: Recipe, run: Run, reward: str | None, resume: bool, force: bool, step: str) -> tuple[Recipe, str]:
    """The recipe the step runs with (model, LoRA, data and SFT as the run was trained; the step's own section, reward
    and budget from `recipe`) and the reward's name; a UserError when the run is not ready for it."""
    label = step.upper()
    trained = merged_run_recipe(run, recipe)
    if recipe.model.chat_template and not trained.model.chat_template:  # given now, for this step's chat prompts
        trained = trained.model_copy(
            update={"model": trained.model.model_copy(update={"chat_template": recipe.model.chat_template})}
        )
    recipe = trained.model_copy(update={step: getattr(recipe, step), "reward": recipe.reward, "budget": recipe.budget})
    reward_name = reward or recipe.reward.name
    recipe = recipe.model_copy(update={"reward": recipe.reward.model_copy(update={"name": reward_name})})
    directory = run.root / step
    has_run = (directory / "metrics.jsonl").exists() or (directory / "checkpoints").exists()
    if has_run and not resume and not force:
        raise UserError(
            f"{run.root} already holds a {label} run; pass --resume to continue it, --force to start it again, "
            f"or use another --run"
        )
    if resume and not has_run and not (directory / "eval_before.json").exists():
        raise UserError(f"--resume: no {label} checkpoint in {directory / 'checkpoints'}; run without --resume")
    return recipe, reward_name


def check_resume_settings(trainer: RLTrainer, state: dict, force: bool) -> None:
    """A resume continues the run it was started as: changed settings are refused unless --force."""
    saved = state.get("settings")
    if saved is None or force:
        return
    current, name = trainer.settings(), trainer.name
    changes = checkpoint.changed_settings(saved[name], current[name], name)
    for key in current.keys() - {name}:
        if key in saved and saved[key] != current[key]:  # a key older checkpoints lack is not a change
            changes.append(f"{key}: {saved[key]!r} -> {current[key]!r}")
    if changes:
        raise UserError(
            f"--resume would change the run's settings ({'; '.join(changes)}); resume with the settings it was "
            f"started with, or pass --force to continue with the new ones"
        )


def execute(
    step: str, make_trainer: Callable[[Recipe, Run, str, Parallel], RLTrainer], describe: Callable[[RLTrainer], str],
    save_adapter: Callable[[RLTrainer], Path], recipe: Recipe, run: Run, reward: str | None, resume: bool, force: bool,
    gpu: str | None,
) -> StepResult:  # fmt: skip
    """The whole step. `describe(trainer)` is the line said after setup; `save_adapter(trainer)` writes the adapter."""
    from rlhf import budget
    from rlhf.rewards import load_spec

    parallel = Parallel()
    main = parallel.is_main
    directory = run.root / step
    recipe, reward_name = prepare(recipe, run, reward, resume, force, step)
    load_spec(reward_name)  # an unknown reward fails now, before anything heavy is loaded
    if getattr(recipe, step).optimizer == "adam_8bit":
        modeling.require_bitsandbytes(f"{step}.optimizer=adam_8bit", f"{step}.optimizer=adam")
    # Prompts from a dataset are sized by the longest of them (tokenized as the step will), not by the document
    # prefixes' prompt_max_tokens.
    from rlhf.budget.lengths import scan_prompts

    lengths, note = scan_prompts(recipe, step)
    out = sys.stdout if main else io.StringIO()
    if note:
        print(f"{step}: {note}", file=out)
    budget.preflight(recipe, step, gpu=gpu, force=force, out=out, lengths=lengths)
    restart = resume and not checkpoint.saved_steps(directory / "checkpoints")
    if restart:  # killed before its first checkpoint: there is nothing to continue from but the start
        resume = False
        if main:
            print(
                f"{step}: warning: no checkpoint in {directory / 'checkpoints'} yet; starting {step.upper()} from "
                f"step 0",
                file=sys.stderr,
            )

    trainer = make_trainer(recipe, run, reward_name, parallel)
    trainer.setup()
    if resume:
        state = trainer.load_checkpoint()
        check_resume_settings(trainer, state, force)
    # The evaluation before training runs before anything is written: a reward that fails on the first samples it
    # sees (a wrong count, a non-number, an exception) stops the step with the run directory as it was.
    before_path = directory / "eval_before.json"
    kept_before = before_path.is_file() and (resume or restart or not force)
    before = json.loads(before_path.read_text()) if kept_before else trainer.evaluate()
    # Only now, with the model, reward, data and checkpoint known to work, does the run directory change.
    if main:
        run.write_recipe(recipe, step)
        if force and not resume and not restart:
            shutil.rmtree(directory / "checkpoints", ignore_errors=True)
            for name in ("metrics.jsonl", "samples.jsonl", "eval.json", "eval_before.json"):
                (directory / name).unlink(missing_ok=True)
        print(f"{step}: {describe(trainer)}", file=sys.stderr)
        if resume or restart:
            trim_jsonl(trainer.log.metrics_path, trainer.step)
            trim_jsonl(trainer.log.samples_path, trainer.step)
            print(f"{step}: resumed at step {trainer.step}", file=sys.stderr)
    parallel.barrier()  # rank 0's deletions and trims are done before any rank writes again

    if main and not kept_before:
        atomic_write_json(before_path, before)
    if main and before:
        accuracy = before.get(f"reward_{accuracy_name(before, before, trainer)}")
        task = f", accuracy {accuracy:.2f}" if accuracy is not None else ""
        print(
            f"{step}: before: reward {before['reward']:.3f}, positive rate {before['positive_rate']:.2f}{task}",
            file=sys.stderr,
        )

    train_interruptibly(trainer, main)
    parallel.check_in_sync(trainer.params)

    adapter = save_adapter(trainer) if main else directory / "adapter"
    parallel.barrier()
    after = trainer.evaluate()
    result = {}
    if main and after:
        result = eval_summary(before, after, trainer)
        atomic_write_json(directory / "eval.json", result)
        print(
            f"{step}: done, {trainer.step} steps. reward {result['reward_before']:.3f} -> "
            f"{result['reward_after']:.3f}, positive rate {result['positive_rate_before']:.2f} -> "
            f"{result['positive_rate_after']:.2f}, KL {result['kl_after']:.2f}, perplexity "
            f"{result['perplexity_before']:.1f} -> {result['perplexity_after']:.1f}, distinct-2 "
            f"{result['distinct_2_before']:.2f} -> {result['distinct_2_after']:.2f}; adapter: {adapter}"
        )
        if "accuracy_after" in result:
            print(
                f"{step}: accuracy ({result['accuracy_reward']}, {result['n_prompts']} held-out prompts) "
                f"{result['accuracy_before']:.2f} -> {result['accuracy_after']:.2f} sampled, "
                f"{result['accuracy_greedy_before']:.2f} -> {result['accuracy_greedy_after']:.2f} greedy"
            )
        collapsed = collapse_warning(result["distinct_2_before"], result["distinct_2_after"])
        if collapsed:
            print(
                f"{step}: warning: {collapsed}; see {step}.kl_ceiling, {step}.diversity_floor and {trainer.kl_setting}"
            )
    return StepResult(run, adapter, trainer.step, result)


def save_adapter(trainer: RLTrainer, card: str, extra: dict[str, dict[str, torch.Tensor]]) -> Path:
    """RUN/<step>/adapter, in one rename: the PEFT adapter (its base named by absolute path, so plain peft finds it
    from anywhere), each `extra` entry as NAME.safetensors, and `card` as README.md."""
    out = trainer.directory / "adapter"
    with atomic_dir(out) as tmp:
        # The policy's adapter only: a learned reward's adapter, loaded into the same PEFT model, is not the policy's.
        trainer.model.save_pretrained(tmp, safe_serialization=True, selected_adapters=[POLICY_ADAPTER])
        for name, tensors in extra.items():
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / f"{name}.safetensors"))
        atomic_write_text(tmp / "README.md", card)
    return out


def train_interruptibly(trainer, main: bool) -> None:
    """trainer.train(); the first Ctrl-C finishes the current step, saves a checkpoint and raises KeyboardInterrupt
    (exit 130), so it never costs more than one step; a second one aborts at once. Any trainer with `name`,
    `stop_requested` and `train()` (the RL trainers, the reward model's)."""

    def on_sigint(signum, frame):
        trainer.stop_requested = True
        if main:
            print(
                f"\n{trainer.name}: interrupted; saving a checkpoint after this step (Ctrl-C again to abort)",
                file=sys.stderr,
            )
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


def accuracy_name(before: dict, after: dict, trainer: RLTrainer) -> str | None:
    """The reward whose mean is the task accuracy: the one the spec marks (accuracy: true), else the first whose
    values were all 0 or 1 before and after."""
    marked = accuracy_reward(trainer.reward)
    if marked is not None:
        return marked
    binary = [n for n in after.get("binary_rewards", []) if n in before.get("binary_rewards", [])]
    return binary[0] if binary else None


def eval_summary(before: dict, after: dict, trainer: RLTrainer) -> dict:
    """eval.json: every number the evaluation measured, `_before` and `_after`, and the samples of both; with a task
    reward, `accuracy_before` / `accuracy_after` (sampled at the step's settings) and `accuracy_greedy_*`."""
    keys = [k for k, v in after.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    keys += [k for k in after if k.startswith("reward_") and after[k] is None]  # applied to no held-out sample
    task = {}
    if (name := accuracy_name(before, after, trainer)) is not None:
        task = {"accuracy_reward": name}
        for kind, key in (("accuracy", f"reward_{name}"), ("accuracy_greedy", f"reward_{name}_greedy")):
            task |= {f"{kind}_before": before.get(key), f"{kind}_after": after.get(key)}
    return {
        **{f"{k}_{when}": ev.get(k) for k in keys for when, ev in (("before", before), ("after", after))},
        **task,
        "early_stop": trainer.early_stop,
        "n_prompts": len(trainer.eval_texts),
        "eval_split": trainer.eval_source,
        "held_out_of_train": trainer.held_out_of_train,  # documents of the train split kept out of training for eval
        "steps": trainer.step,
        "samples_before": before["samples"],
        "samples_after": after["samples"],
    }
