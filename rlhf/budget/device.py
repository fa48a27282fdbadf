"""The memory a step is planned against: a GPU named or sized on the command line or in the recipe, the GPU of this
machine (its free memory), or free RAM for a CPU run."""

from __future__ import annotations

from dataclasses import dataclass

from rlhf.config import Recipe
from rlhf.errors import UserError
from rlhf.units import GiB, MiB, format_bytes, parse_size

# Memory torch.cuda.mem_get_info reports as total on each card (the driver keeps the rest of the nominal size).
GPUS = {
    "rtx4090": int(23.64 * GiB),
    "rtx3090": int(23.69 * GiB),
    "a10": int(22.19 * GiB),
    "l4": int(22.17 * GiB),
    "t4": int(14.75 * GiB),
    "a100-40": int(39.50 * GiB),
    "a100-80": int(79.14 * GiB),
    "h100": int(79.10 * GiB),
}
CUDA_CONTEXT = 500 * MiB  # driver context + kernels; outside torch's allocator, so not in max_memory_reserved


def gpu_bytes(spec: str, source: str = "--gpu") -> int:
    """A GPU name (rtx4090, a100-80, ...) or a size (24GiB, 512MiB, 24GB) in bytes; UserError otherwise."""
    key = spec.strip().lower()
    if key in GPUS:
        return GPUS[key]
    size = parse_size(spec)
    if size is None:
        raise UserError(
            f"{source} '{spec}' is neither a GPU name nor a size; use one of {', '.join(GPUS)}, "
            f"or a size like 24GiB, 512MiB or 24GB"
        )
    return size


@dataclass(frozen=True)
class Device:
    bytes: int
    description: str
    kind: str  # "cuda" (plan for a GPU) or "cpu" (a CPU run: RAM)


def resolve_device(gpu: str | None, recipe: Recipe) -> Device:
    """Precedence: --gpu > the recipe's budget.gpu > the GPU here (its free memory) > free RAM for a CPU run."""
    if gpu:
        size = gpu_bytes(gpu)
        return Device(size, f"{format_bytes(size)} (--gpu {gpu})", "cuda")
    if recipe.budget.gpu:
        size = gpu_bytes(recipe.budget.gpu, "budget.gpu")
        return Device(size, f"{format_bytes(size)} (recipe budget.gpu: {recipe.budget.gpu})", "cuda")
    import torch

    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        # Querying created this process's CUDA context, which `free` already excludes and the estimate counts.
        usable = min(free + CUDA_CONTEXT, total)
        name = torch.cuda.get_device_name()
        return Device(usable, f"{format_bytes(usable)} free on {name} (of {format_bytes(total)})", "cuda")
    return ram_device()


def ram_device() -> Device:
    import psutil

    available = psutil.virtual_memory().available
    return Device(available, f"{format_bytes(available)} of free RAM (CPU)", "cpu")
