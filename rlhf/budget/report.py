"""The budget as people and programs read it: the table (`rlhf budget`, before every step), the verdict, the JSON,
and the pre-flight that refuses a step that will not fit."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rlhf.budget.device import ram_device, resolve_device
from rlhf.budget.fit import suggest
from rlhf.budget.lengths import DataLengths, scan
from rlhf.budget.peak import COMPONENTS, STEPS, Estimate, estimate
from rlhf.config import Recipe
from rlhf.errors import DoesNotFit
from rlhf.units import format_bytes

_SHRINK = {
    "sft": {
        "weights": "model.quantization=4bit (NF4: ~0.52 B/param)",
        "lora": "lora.rank, lora.target_modules",
        "gradients": "lora.rank, lora.target_modules",
        "optimizer": "sft.optimizer=adamw_8bit (2 B/param instead of 8)",
        "activations": "sft.batch_size (+ gradient_accumulation_steps), sft.block_size, gradient checkpointing",
        "logits": "sft.batch_size, sft.block_size",
        "overhead": "fixed: CUDA context + allocator fragmentation",
    },
    "reward": {
        "weights": "model.quantization=4bit (NF4: ~0.52 B/param)",
        "lora": "reward_model.lora.rank, reward_model.lora.target_modules",
        "gradients": "reward_model.lora.rank, reward_model.lora.target_modules",
        "optimizer": "reward_model.optimizer=adamw_8bit (2 B/param instead of 8)",
        "activations": "reward_model.batch_size (+ gradient_accumulation_steps), reward_model.max_length",
        "overhead": "fixed: CUDA context + allocator fragmentation",
    },
    "ppo": {
        "weights": "model.quantization=4bit (NF4: ~0.52 B/param)",
        "lora": "ppo.lora.rank, ppo.lora.target_modules",
        "gradients": "ppo.lora.rank",
        "optimizer": "ppo.optimizer=adam_8bit (2 B/param instead of 8)",
        "activations": "ppo.gradient_accumulation_steps (smaller micro-batch), ppo.rollout_batch_size",
        "logits": "ppo.rollout_batch_size, ppo.generation.max_new_tokens",
        "kv_cache": "ppo.rollout_batch_size, ppo.prompt_max_tokens, ppo.generation.max_new_tokens",
        "value_head": "ppo.rollout_batch_size",
        "reward_model": "device: cpu in the reward spec (a learned reward: ppo.rollout_batch_size)",
        "overhead": "fixed: CUDA context + allocator fragmentation",
    },
    "merge": {
        "weights": "the largest tensor's working set (base, 2 x fp32, output)",
        "lora": "the adapter, twice (ours and peft's reference)",
        "overhead": "this process: Python, torch, transformers",
    },
}
_SHRINK["dpo"] = {
    "weights": "model.quantization=4bit (NF4: ~0.52 B/param)",
    "lora": "dpo.lora.rank, dpo.lora.target_modules",
    "gradients": "dpo.lora.rank, dpo.lora.target_modules",
    "optimizer": "dpo.optimizer=adamw_8bit (2 B/param instead of 8)",
    "activations": "dpo.batch_size (+ gradient_accumulation_steps), dpo.max_length",
    "logits": "dpo.batch_size, dpo.max_length",
    "overhead": "fixed: CUDA context + allocator fragmentation",
}
# GRPO's knobs are PPO's, in its own section; no value head.
_SHRINK["grpo"] = {k: v.replace("ppo.", "grpo.") for k, v in _SHRINK["ppo"].items() if k != "value_head"}


def render_table(est: Estimate, suggestions: bool = True) -> str:
    total = est.total_bytes
    where = "RAM" if est.step == "merge" else ("RAM (CPU run)" if est.device_kind == "cpu" else "GPU")
    ram = (
        ", planned against this machine's free RAM (a CPU run; --gpu NAME|SIZE plans for a card)"
        if est.device_kind == "cpu" and est.step != "merge"
        else ""
    )
    lines = [
        f"memory budget: {est.step} of {est.model} ({est.params:,} parameters){ram}",
        f"  {est.settings}",
        f"  plan for: {est.device}",
        f"  peak: {est.peak}",
        "",
        f"  {'component':<13} {'size':>11} {'share':>6}  what shrinks it",
    ]
    for name in COMPONENTS:
        size = est.components.get(name, 0)
        share = f"{100 * size / total:5.1f}%" if total else "    -"
        hint = _SHRINK.get(est.step, {}).get(name, "") if size else ""
        if name == "overhead" and est.step != "merge" and est.device_kind == "cpu":
            hint = "fixed: allocator fragmentation"
        lines.append(f"  {name:<13} {format_bytes(size):>11} {share}  {hint}".rstrip())
    lines.append(f"  {'total':<13} {format_bytes(total):>11} 100.0%  ({where})")
    if len(est.moments) > 1:
        others = ", ".join(f"{name} {format_bytes(size)}" for name, size in est.moment_totals.items())
        lines.append(f"  each moment: {others}")
    if est.context_bytes:
        lines.append(
            f"  overhead includes the CUDA context ({format_bytes(est.context_bytes)}), outside torch's reserved memory"
        )
    for note in est.notes:
        lines.append(f"  {note}")
    if est.disk_bytes is not None:
        free = f"; free {format_bytes(est.disk_free)}" if est.disk_free is not None else ""
        lines.append(f"  disk: {format_bytes(est.disk_bytes)} for the merged shards{free}")
    lines.append("")
    lines.append(verdict(est))
    if suggestions and not est.fits:
        ranked = suggest(est)
        if ranked:
            lines.append("cheapest changes, each re-estimated (KEY=VALUE overrides: add them to the command):")
            for n, s in enumerate(ranked, 1):
                status = "fits" if s.fits else "still over"
                why = "; ".join(c.why for c in s.changes if c.why)
                lines.append(f"  {n}. {s.text} -> {format_bytes(s.total_bytes)}, {status} ({why})")
    return "\n".join(lines)


def verdict(est: Estimate) -> str:
    total, device = est.total_bytes, est.device_bytes
    share = f"{100 * abs(est.margin) / device:.1f}%" if device else "-"
    if not est.disk_fits:
        return (
            f"does NOT fit: the merged model needs {format_bytes(est.disk_bytes)} of disk, "
            f"{format_bytes(est.disk_free)} free"
        )
    if est.fits:
        return f"fits: {format_bytes(total)} of {format_bytes(device)}, {format_bytes(est.margin)} ({share}) to spare"
    return (
        f"does NOT fit: needs {format_bytes(total)}, has {format_bytes(device)} "
        f"({format_bytes(-est.margin)} over, {share})"
    )


def to_json(est: Estimate) -> dict:
    """`rlhf budget --json` for one step: the Estimate's numbers, the peak moment, the device planned against and the
    changes that would shrink it, each as the KEY=VALUE overrides to paste."""
    return est.to_json() | {
        "peak_moment": est.peak,
        "device_kind": est.device_kind,
        "device": est.device,
        "suggestions": [
            {"overrides": s.text, "total_bytes": s.total_bytes, "fits": s.fits}
            for s in (suggest(est) if not est.fits else [])
        ],
    }


def main(recipe: Recipe, step: str, gpu: str | None, as_json: bool) -> int:
    """`rlhf budget`: print the table (or JSON) for one step or all; exit 3 when a step does not fit, else 0."""
    steps = list(STEPS) if step == "all" else [step]
    estimates = []
    for name in steps:
        device = ram_device() if name == "merge" else resolve_device(gpu, recipe)
        lengths, note = scan(recipe, name)
        est = estimate(
            recipe, name, device.bytes, device_kind=device.kind, device_description=device.description, lengths=lengths
        )
        est.notes += [note] if note else []
        estimates.append(est)
    if as_json:
        data = [to_json(e) for e in estimates]
        print(json.dumps(data if step == "all" else data[0], indent=2))
    else:
        print("\n\n".join(render_table(e) for e in estimates))
    return 0 if all(e.fits for e in estimates) else DoesNotFit.exit_code


def preflight(
    recipe: Recipe,
    step: str,
    gpu: str | None,
    force: bool,
    out=sys.stdout,
    disk_path: Path | str | None = None,
    lengths: DataLengths | None = None,
) -> Estimate:
    """Print the budget for `step`; raise DoesNotFit when it will not fit, unless `force` (then warn and go on).
    `lengths`: what the step measured on the data it loaded (`budget.lengths`)."""
    device = ram_device() if step == "merge" else resolve_device(gpu, recipe)
    est = estimate(
        recipe,
        step,
        device.bytes,
        device_kind=device.kind,
        device_description=device.description,
        disk_path=disk_path,
        lengths=lengths,
    )
    report = render_table(est)
    print(report, file=out, flush=True)
    if est.fits:
        return est
    if force:
        print(
            f"warning: {step} is predicted not to fit ({verdict(est)}); going on because of --force",
            file=out,
            flush=True,
        )
        return est
    ranked = suggest(est)
    hint = next((s for s in ranked if s.fits), None)
    fix = f"; cheapest fix: {hint.text}" if hint else "; see the changes above"
    raise DoesNotFit(
        f"{step} needs {format_bytes(est.total_bytes)} but {est.device} ({verdict(est)}){fix}; "
        f"or pass --force to try anyway",
        report,
    )
