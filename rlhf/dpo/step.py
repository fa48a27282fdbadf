"""`rlhf dpo`: check the run, print the memory budget, train, save the adapter, evaluate before and after.

1. the run must hold a merged model; a finished DPO run needs --resume or --force; a resume keeps its settings
2. the budget pre-flight (exit 3 when it does not fit)
3. setup (data, then model and optimizer); only then does the run directory change
4. held-out pairs (and, with dpo.judge, generations) before, kept in eval_before.json; train with Ctrl-C -> checkpoint
5. the same after; adapter/ and eval.json
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rlhf import modeling
from rlhf.config import Recipe
from rlhf.diversity import collapse_warning
from rlhf.dpo.trainer import DpoTrainer
from rlhf.io import atomic_dir, atomic_write_json, atomic_write_text
from rlhf.rl import pairs
from rlhf.rl.step import train_interruptibly
from rlhf.runs import Run

PAIR_KEYS = ("accuracy", "margin_mean", "chosen_reward", "rejected_reward", "loss", "kl_proxy", "likelihood_accuracy")


@dataclass
class DpoResult:
    run: Run
    adapter: Path
    steps: int
    eval: dict


def evaluate(trainer: DpoTrainer) -> dict:
    return {"pairs": trainer.evaluate_pairs(), "generations": trainer.evaluate_generations()}


def run(recipe: Recipe, run: Run, resume: bool = False, force: bool = False, gpu: str | None = None) -> DpoResult:
    recipe, trainer = pairs.start(DpoTrainer, recipe, run, "dpo", "dpo", "DPO", resume, force, gpu)
    cfg = recipe.dpo
    trainable, total = modeling.count_parameters(trainer.model)
    print(
        f"dpo: LoRA r={cfg.lora.rank} on {recipe.model.quantization} merged model (reference: the adapter disabled): "
        f"{trainable:,} trainable of {total:,}; {cfg.loss_type} loss, beta {cfg.beta}; {len(trainer.train_pairs)} "
        f"training pairs ({trainer.train_pairs.n_too_long} over {cfg.max_length} tokens left out), "
        f"{len(trainer.eval_pairs)} held-out from {trainer.eval_pairs.source}; {trainer.total_steps} steps",
        file=sys.stderr,
    )

    before_path = run.dpo_dir / "eval_before.json"
    if before_path.is_file():
        before = json.loads(before_path.read_text())
    else:
        before = evaluate(trainer)
        atomic_write_json(before_path, before)
    _say("before", before)

    train_interruptibly(trainer, main=True)

    adapter = save_adapter(trainer)
    after = evaluate(trainer)
    result = summary(before, after, trainer)
    atomic_write_json(run.dpo_dir / "eval.json", result)
    _say("after", after)
    line = (
        f"dpo: done, {trainer.step} steps. held-out preference accuracy {result['accuracy_before']:.3f} -> "
        f"{result['accuracy_after']:.3f}, margin {result['margin_mean_before']:+.3f} -> "
        f"{result['margin_mean_after']:+.3f} ({result['n_pairs']} pairs)"
    )
    if "positive_rate_after" in result:
        line += (
            f"; judged positive rate {result['positive_rate_before']:.2f} -> {result['positive_rate_after']:.2f}, KL "
            f"{result['kl_after']:.2f}, distinct-2 {result['distinct_2_before']:.2f} -> "
            f"{result['distinct_2_after']:.2f}"
        )
    print(f"{line}; adapter: {adapter}")
    if "distinct_2_after" in result:
        collapsed = collapse_warning(result["distinct_2_before"], result["distinct_2_after"])
        if collapsed:
            print(f"dpo: warning: {collapsed}; a larger dpo.beta keeps the policy nearer the reference")
    return DpoResult(run, adapter, trainer.step, result)


def _say(when: str, ev: dict) -> None:
    pairs, gens = ev["pairs"], ev["generations"]
    line = (
        f"dpo: {when}: held-out preference accuracy {pairs['accuracy']:.3f} (the policy's own likelihood ranking "
        f"{pairs['likelihood_accuracy']:.3f})"
    )
    if gens:
        line += f", judged positive rate {gens['positive_rate']:.2f}, distinct-2 {gens['distinct_2']:.2f}"
    print(line, file=sys.stderr)


def summary(before: dict, after: dict, trainer: DpoTrainer) -> dict:
    """eval.json: the held-out pairs' numbers `_before` and `_after`; with a judge, PPO's evaluation keys too."""
    result = {
        **{f"{k}_{when}": ev["pairs"][k] for k in PAIR_KEYS for when, ev in (("before", before), ("after", after))},
        "n_pairs": after["pairs"]["n_pairs"],
        "eval_split": trainer.eval_pairs.source,
        "train_pairs": len(trainer.train_pairs),
        "left_out_too_long": trainer.train_pairs.n_too_long + trainer.eval_pairs.n_too_long,
        "steps": trainer.step,
        "loss_type": trainer.cfg.loss_type,
        "beta": trainer.cfg.beta,
        "label_smoothing": trainer.cfg.label_smoothing,
    }
    gen_before, gen_after = before["generations"], after["generations"]
    if gen_after:
        keys = [k for k, v in gen_after.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        result |= {
            f"{k}_{when}": ev.get(k) for k in keys for when, ev in (("before", gen_before), ("after", gen_after))
        }
        result |= {
            "judge": trainer.cfg.judge,
            "n_prompts": len(trainer.eval_texts),
            "prompts_split": trainer.eval_source,
            "samples_before": gen_before.get("samples", []),
            "samples_after": gen_after["samples"],
        }
    return result


def save_adapter(trainer: DpoTrainer) -> Path:
    """RUN/dpo/adapter in one rename: the PEFT adapter (its base named by absolute path, so plain peft loads it from
    anywhere) and a README card."""
    out = trainer.run.dpo_adapter
    with atomic_dir(out) as tmp:
        trainer.model.save_pretrained(tmp, safe_serialization=True)
        atomic_write_text(tmp / "README.md", _card(trainer))
    return out


def _card(trainer: DpoTrainer) -> str:
    cfg = trainer.cfg
    targets = modeling.adapter_targets(trainer.model)
    return (
        f"# DPO policy adapter (rlhf dpo)\n\n"
        f"- base: {trainer.run.merged.resolve()} (the merged SFT model of this run; also DPO's reference)\n"
        f"- preference data: {cfg.dataset} ({len(trainer.train_pairs)} pairs)\n"
        f"- loss: {cfg.loss_type}, beta {cfg.beta}, label smoothing {cfg.label_smoothing}\n"
        f"- LoRA: r={cfg.lora.rank}, alpha={cfg.lora.alpha}, targets {', '.join(targets)}\n"
        f"- steps: {trainer.step} of {cfg.batch_size * cfg.gradient_accumulation_steps} pairs, learning rate "
        f"{cfg.learning_rate}\n"
        f"- date: {time.strftime('%Y-%m-%d')}\n\n"
        f"Load with `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), this_dir)`.\n"
    )
