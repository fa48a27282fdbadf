"""`rlhf reward`: check the run, print the memory budget, train, save the adapter and head, evaluate before and after.

1. the run must hold a merged model; a finished reward model needs --resume or --force; a resume keeps its settings
2. the budget pre-flight (exit 3 when it does not fit)
3. setup (data, then model and optimizer); only then does the run directory change
4. held-out accuracy before (kept in eval_before.json), train with Ctrl-C -> checkpoint
5. held-out accuracy after; the head centred on the held-out answers; adapter/ and eval.json
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from rlhf import modeling
from rlhf.config import Recipe
from rlhf.io import atomic_dir, atomic_write_json, atomic_write_text
from rlhf.reward_model.loss import pair_stats
from rlhf.reward_model.trainer import RewardTrainer
from rlhf.rl import pairs
from rlhf.rl.reward import base_fingerprint
from rlhf.rl.reward_files import INFO, SCORE_HEAD
from rlhf.rl.step import train_interruptibly
from rlhf.runs import Run

EVAL_KEYS = ("accuracy", "margin_mean", "chosen_mean", "rejected_mean", "loss")
N_SAMPLES = 4


@dataclass
class RewardResult:
    run: Run
    adapter: Path
    steps: int
    eval: dict


def run(recipe: Recipe, run: Run, resume: bool = False, force: bool = False, gpu: str | None = None) -> RewardResult:
    recipe, trainer = pairs.start(
        RewardTrainer, recipe, run, "reward", "reward_model", "reward model", resume, force, gpu
    )
    cfg = recipe.reward_model
    trainable, total = modeling.count_parameters(trainer.model)
    print(
        f"reward: LoRA r={cfg.lora.rank} + score head on {recipe.model.quantization} merged model: "
        f"{trainable + sum(p.numel() for p in trainer.head.parameters()):,} trainable of {total:,}; "
        f"{len(trainer.train_pairs)} training pairs ({trainer.train_pairs.n_too_long} over {cfg.max_length} tokens "
        f"left out), {len(trainer.eval_pairs)} held-out from {trainer.eval_pairs.source}; {trainer.total_steps} steps",
        file=sys.stderr,
    )

    before_path = run.reward_dir / "eval_before.json"
    if before_path.is_file():
        before = json.loads(before_path.read_text())
    else:
        before = trainer.evaluate()
        atomic_write_json(before_path, before)
    print(f"reward: before: held-out accuracy {before['accuracy']:.3f}", file=sys.stderr)

    train_interruptibly(trainer, main=True)

    # Scores are defined up to a constant: shift the head so held-out answers score 0 on average. Then score > 0
    # reads "better than the typical answer" (a learned reward's `positive`), and PPO sees rewards around 0.
    chosen, rejected = trainer.held_out_scores()
    offset = torch.cat([chosen, rejected]).mean().item()
    with torch.no_grad():
        trainer.head.score.bias -= offset
    after = pair_stats(chosen - offset, rejected - offset)
    adapter = save_adapter(trainer, offset)
    result = {
        **{f"{k}_{when}": ev[k] for k in EVAL_KEYS for when, ev in (("before", before), ("after", after))},
        "n_pairs": after["n_pairs"],
        "eval_split": trainer.eval_pairs.source,
        "train_pairs": len(trainer.train_pairs),
        "left_out_too_long": trainer.train_pairs.n_too_long + trainer.eval_pairs.n_too_long,
        "steps": trainer.step,
        "score_offset": offset,
        "samples_after": _samples(trainer, chosen - offset, rejected - offset),
    }
    atomic_write_json(run.reward_dir / "eval.json", result)
    print(
        f"reward: done, {trainer.step} steps. held-out accuracy {result['accuracy_before']:.3f} -> "
        f"{result['accuracy_after']:.3f}, margin {result['margin_mean_before']:+.3f} -> "
        f"{result['margin_mean_after']:+.3f} ({result['n_pairs']} pairs); adapter: {adapter}"
    )
    return RewardResult(run, adapter, trainer.step, result)


def _samples(trainer: RewardTrainer, chosen: torch.Tensor, rejected: torch.Tensor) -> list[dict]:
    decode = trainer.tokenizer.decode
    pairs = trainer.eval_pairs
    return [
        {
            "chosen": decode(pairs.chosen[i]),
            "rejected": decode(pairs.rejected[i]),
            "chosen_score": chosen[i].item(),
            "rejected_score": rejected[i].item(),
        }
        for i in range(min(N_SAMPLES, len(pairs)))
    ]


def save_adapter(trainer: RewardTrainer, offset: float) -> Path:
    """RUN/reward/adapter: the PEFT adapter (its base named by absolute path), score_head.safetensors, and
    reward_model.json (the base's fingerprint, which `rlhf ppo --reward` checks)."""
    out, run = trainer.run.reward_adapter, trainer.run
    with atomic_dir(out) as tmp:
        trainer.model.save_pretrained(tmp, safe_serialization=True)
        head = {k: v.detach().cpu().contiguous() for k, v in trainer.head.state_dict().items()}
        save_file(head, str(tmp / SCORE_HEAD))
        info = {
            "base": str(run.merged.resolve()),
            "base_fingerprint": base_fingerprint(run.merged),
            "hidden_size": int(head["score.weight"].shape[1]),
            "score_offset": offset,
            "dataset": trainer.cfg.dataset,
            "steps": trainer.step,
        }
        atomic_write_json(tmp / INFO, info)
        atomic_write_text(tmp / "README.md", _card(trainer, info))
    return out


def _card(trainer: RewardTrainer, info: dict) -> str:
    cfg = trainer.cfg
    targets = modeling.adapter_targets(trainer.model)
    return (
        f"# Reward model adapter (rlhf reward)\n\n"
        f"- base: {info['base']} (the merged SFT model of this run)\n"
        f"- preference data: {cfg.dataset} ({len(trainer.train_pairs)} pairs)\n"
        f"- LoRA: r={cfg.lora.rank}, alpha={cfg.lora.alpha}, targets {', '.join(targets)}\n"
        f"- steps: {trainer.step} of {cfg.batch_size * cfg.gradient_accumulation_steps} pairs, learning rate "
        f"{cfg.learning_rate}\n"
        f"- date: {time.strftime('%Y-%m-%d')}\n\n"
        f"The score of a text is `{SCORE_HEAD}` (`score.weight`, `score.bias`: Linear(hidden, 1), fp32) applied to\n"
        f"the final hidden state of its last token; the bias is shifted so held-out answers score 0 on average.\n"
        f"Load with `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), this_dir)`.\n"
    )
