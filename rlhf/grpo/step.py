"""`rlhf grpo`: the RL step (rlhf.rl.step: checks, budget, setup, evaluation before and after, Ctrl-C -> checkpoint)
with the GRPO trainer; its adapter is the policy LoRA alone (no value head)."""

from __future__ import annotations

import time
from pathlib import Path

from rlhf import modeling
from rlhf.config import Recipe
from rlhf.grpo.trainer import GRPOTrainer
from rlhf.rl import step as rl_step
from rlhf.runs import Run


def run(
    recipe: Recipe, run: Run, reward: str | None = None, resume: bool = False, force: bool = False,
    gpu: str | None = None,
) -> rl_step.StepResult:  # fmt: skip
    return rl_step.execute("grpo", GRPOTrainer, _describe, save_adapter, recipe, run, reward, resume, force, gpu)


def _describe(trainer: GRPOTrainer) -> str:
    cfg = trainer.cfg
    trainable, total = modeling.count_parameters(trainer.model)
    kl = f"beta {cfg.beta:g} x KL in the {cfg.kl_in}"
    return (
        f"policy LoRA r={cfg.lora.rank} on {trainer.recipe.model.quantization} merged model, no value head: "
        f"{trainable:,} trainable of {total:,}; {cfg.advantage} advantages over groups of {cfg.group_size}, {kl}; "
        f"reward: {trainer.reward_name}"
    )


def save_adapter(trainer: GRPOTrainer) -> Path:
    """RUN/grpo/adapter: the policy's PEFT adapter (its base named by absolute path) and a card."""
    cfg, recipe, run = trainer.cfg, trainer.recipe, trainer.run
    targets = ", ".join(modeling.adapter_targets(trainer.model))
    card = (
        f"# GRPO policy adapter (rlhf grpo)\n\n"
        f"- base: {run.merged.resolve()} (the merged SFT model of this run: {recipe.model.name} + SFT adapter)\n"
        f"- reward: {trainer.reward_name}\n"
        f"- LoRA: r={cfg.lora.rank}, alpha={cfg.lora.alpha}, targets {targets}\n"
        f"- steps: {trainer.step} of {cfg.batch_size} prompts x {cfg.group_size} samples, {cfg.advantage} advantages, "
        f"beta {cfg.beta:g} (KL in the {cfg.kl_in}), learning rate {cfg.learning_rate}\n"
        f"- date: {time.strftime('%Y-%m-%d')}\n\n"
        f"Critic-free: no value head. Load with `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), "
        f"this_dir)`.\n"
    )
    return rl_step.save_adapter(trainer, card, {})
