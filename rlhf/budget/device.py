"""The memory a step is planned against: a GPU named or sized on the command line or in the recipe, the GPU of this
machine (its free memory), or free RAM for a CPU run."""

from __future__ import annotations

import re
from dataclasses import dataclass

from rlhf.config import Recipe
from rlhf.errors import UserError
from rlhf.units import GiB, MiB, format_bytes, parse_size

# Memory torch.cuda.mem_get_info reports as total on each card (the driver keeps the rest of the nominal size). The
# first eight were read on the cards; the consumer cards and the A10G below them are nvidia-smi's total less the
# ~300 MiB the driver keeps on the cards above (not measured here): plan with a little margin.
GPUS = {
    "rtx4090": int(23.64 * GiB),
    "rtx3090": int(23.69 * GiB),
    "a10": int(22.19 * GiB),
    "l4": int(22.17 * GiB),
    "t4": int(14.75 * GiB),
    "a100-40": int(39.50 * GiB),
    "a100-80": int(79.14 * GiB),
    "h100": int(79.10 * GiB),
    "rtx3060": int(11.70 * GiB),  # the 12 GB RTX 3060
    "rtx4060ti-16gb": int(15.70 * GiB),
    "rtx4070tisuper": int(15.70 * GiB),
    "rtx4080": int(15.70 * GiB),
    "rtx5090": int(31.55 * GiB),
    "a10g": int(22.19 * GiB),  # AWS's A10 (g5 instances): the A10's 24 GB
}
# Other spellings people write: 4090, RTX 4090, "GeForce RTX 4060 Ti", 4070-ti-super, A10G ...
# (a bare 4060 Ti is no alias: it also comes with 8 GB)
ALIASES = {"rtx4060ti16": "rtx4060ti-16gb"}


def gpu_name(spec: str) -> str | None:
    """The GPUS key a user's spelling names (case, spaces, dashes, NVIDIA/GeForce and RTX are optional); None."""
    key = re.sub(r"[\s_\-]", "", spec.lower()).removeprefix("nvidia").removeprefix("geforce")
    plain = {re.sub(r"[\s_\-]", "", name): name for name in GPUS}
    for candidate in (key, f"rtx{key}"):
        if candidate in plain:
            return plain[candidate]
        if candidate in ALIASES:
            return ALIASES[candidate]
    return None


CUDA_CONTEXT = 500 * MiB  # driver context + kernels; outside torch's allocator, so not in max_memory_reserved


def gpu_bytes(spec: str, source: str = "--gpu") -> int:
    """A GPU name (rtx4090, a100-80, ...) or a size (24GiB, 512MiB, 24GB) in bytes; UserError otherwise."""
    name = gpu_name(spec)
    if name is not None:
        return GPUS[name]
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
