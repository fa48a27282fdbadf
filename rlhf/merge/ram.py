"""The RAM and disk a merge needs: the prediction, and the check against what this machine has.

`rlhf budget` plans a merge with these same functions, from shapes instead of a checkpoint."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

from rlhf.errors import DoesNotFit
from rlhf.units import format_bytes

if TYPE_CHECKING:  # the merge's own modules import torch; the budget's use of this file must not
    import torch

    from rlhf.merge.adapters import MergePlan
    from rlhf.tensorfiles import TensorEntry


def working_set_bytes(
    numel: int, in_bytes: int, out_bytes: int, *, merged: bool, cast: bool, rounded: bool = False
) -> int:
    """The bytes one tensor needs while the stream handles it.

    A LoRA target holds the base tensor, two fp32 tensors and the output (`step.merge_lora_weight`): 12 bytes an
    element for an fp16 base. Any other tensor: its input, and its output when the dtype changes (`cast`). A tensor
    rounded through NF4 (`merge.base_weights=dequantized`) holds its input, an fp32 copy, the 4-bit codes and the fp32
    dequantization while it is rounded; the fp32 result then stands in for the input.
    """
    if rounded:
        rounding = numel * (in_bytes + 8) + numel // 2
        return max(rounding, working_set_bytes(numel, 4, out_bytes, merged=merged, cast=True))
    if merged:
        return numel * (in_bytes + 8 + out_bytes)
    return numel * (in_bytes + (out_bytes if cast else 0))


def peak_ram_parts(process_bytes: int, adapter_bytes: int, largest_working_set: int) -> dict[str, int]:
    """The merge's peak RAM, part by part: the process before the stream, the adapter twice (ours and peft's copy
    in `verify.PeftReference`), and the largest one-tensor working set."""
    return {"process": process_bytes, "adapters": 2 * adapter_bytes, "tensor": largest_working_set}


def largest_working_set(
    entries: list[TensorEntry], plan: MergePlan, dtype: torch.dtype, rounded: set[str] = frozenset()
) -> int:
    """The largest `working_set_bytes` among the checkpoint's tensors, merged into `dtype` (`rounded`: through NF4)."""
    from rlhf.merge.io import output_dtype

    def need(entry: TensorEntry) -> int:
        out = output_dtype(entry.dtype, dtype)
        merged = entry.name in plan.targets or entry.name in plan.bias_targets
        return working_set_bytes(
            entry.numel,
            entry.dtype.itemsize,
            out.itemsize,
            merged=merged,
            cast=out != entry.dtype,
            rounded=entry.name in rounded,
        )

    return max(map(need, entries), default=0)


def predict_peak_ram(
    entries: list[TensorEntry],
    plan: MergePlan,
    dtype: torch.dtype,
    adapter_bytes: int,
    rounded: set[str] = frozenset(),
) -> int:
    """This process now, plus the adapter twice, plus the largest one-tensor working set (`peak_ram_parts`)."""
    rss = psutil.Process().memory_info().rss
    return sum(peak_ram_parts(rss, adapter_bytes, largest_working_set(entries, plan, dtype, rounded)).values())


def check_fits(
    predicted: int, out_bytes: int, out_dir: Path, entries: list[TensorEntry], adapter_bytes: int, force: bool
) -> None:
    """Print the RAM and disk the merge needs; raise DoesNotFit when this machine lacks them (unless force)."""
    from rlhf.merge.io import group_by_file

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
