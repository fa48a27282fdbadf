"""The RAM and disk a merge needs: the prediction, and the check against what this machine has."""

from __future__ import annotations

import shutil
from pathlib import Path

import psutil
import torch

from rlhf.errors import DoesNotFit
from rlhf.merge.adapters import MergePlan
from rlhf.merge.io import TensorEntry, group_by_file, output_dtype
from rlhf.units import format_bytes


def predict_peak_ram(entries: list[TensorEntry], plan: MergePlan, dtype: torch.dtype, adapter_bytes: int) -> int:
    """This process now, plus the adapter twice (ours and peft's copy), plus the largest one-tensor working set.

    A LoRA target holds the base tensor, two fp32 tensors and the output (merge_lora_weight): 12 bytes an element
    for an fp16 base. Any other tensor: its input, and its output when the dtype changes.
    """
    largest = 0
    for entry in entries:
        out = entry.numel * output_dtype(entry.dtype, dtype).itemsize
        if entry.name in plan.targets or entry.name in plan.bias_targets:
            need = entry.nbytes + 8 * entry.numel + out
        else:
            need = entry.nbytes + (out if entry.dtype != output_dtype(entry.dtype, dtype) else 0)
        largest = max(largest, need)
    return psutil.Process().memory_info().rss + 2 * adapter_bytes + largest


def check_fits(
    predicted: int, out_bytes: int, out_dir: Path, entries: list[TensorEntry], adapter_bytes: int, force: bool
) -> None:
    """Print the RAM and disk the merge needs; raise DoesNotFit when this machine lacks them (unless force)."""
    now = psutil.Process().memory_info().rss
    available = psutil.virtual_memory().available
    existing = next(p for p in [out_dir, *out_dir.parents] if p.exists())
    free_disk = shutil.disk_usage(existing).free
    largest_shard = max(sum(e.nbytes for e in group) for group in group_by_file(entries).values())
    report = (
        f"  RAM:  predicted peak {format_bytes(predicted)} (this process {format_bytes(now)}, "
        f"adapter {format_bytes(adapter_bytes)}, one tensor at a time; largest input shard "
        f"{format_bytes(largest_shard)}); available {format_bytes(available)}\n"
        f"  disk: {format_bytes(out_bytes)} for the merged shards in {out_dir.parent}; free {format_bytes(free_disk)}"
    )
    print(report, flush=True)
    problems = []
    if predicted - now > available:
        problems.append(f"about {format_bytes(predicted - now)} more RAM than the {format_bytes(available)} available")
    if out_bytes > free_disk:
        problems.append(f"{format_bytes(out_bytes)} of disk but {out_dir.parent} has {format_bytes(free_disk)} free")
    if problems and not force:
        raise DoesNotFit(f"the merge needs {' and '.join(problems)}; free some, or pass --force to try anyway", report)
