"""`rlhf ppo`: the RL step (rlhf.rl.step: checks, budget, setup, evaluation before and after, Ctrl-C -> checkpoint)
with the PPO trainer; its adapter is saved with the value head."""

from __future__ import annotations

import time
from pathlib import Path

from rlhf import modeling
from rlhf.config import Recipe
from rlhf.ppo.trainer import PPOTrainer
from rlhf.rl import step as rl_step
from rlhf.runs import Run


def prepare(recipe: Recipe, run: Run, reward: str | None, resume: bool, force: bool) -> tuple[Recipe, str]:
    return rl_step.prepare(recipe, run, reward, resume, force, "ppo")


def run(
    recipe: Recipe, run: Run, reward: str | None = None, resume: bool = False, force: bool = False,
    gpu: str | None = None,
) -> rl_step.StepResult:  # fmt: skip
    return rl_step.execute("ppo", PPOTrainer, _describe, save_adapter, recipe, run, reward, resume, force, gpu)


def _describe(trainer: PPOTrainer) -> str:
    trainable, total = modeling.count_parameters(trainer.model)
    return (
        f"policy LoRA r={trainer.cfg.lora.rank} + value head on {trainer.recipe.model.quantization} merged model: "
        f"{trainable:,} trainable of {total:,}; reward: {trainer.reward_name}"
    )


def save_adapter(trainer: PPOTrainer) -> Path:
    """RUN/ppo/adapter: a PEFT adapter (its base named by absolute path, so plain peft finds it from anywhere) and
    value_head.safetensors."""
    targets = modeling.adapter_targets(trainer.model)
    card = _card(trainer.recipe, trainer.reward_name, trainer.step, trainer.run, targets)
    return rl_step.save_adapter(trainer, card, {"value_head": trainer.policy.value_head.state_dict()})


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
