"""Floating-point dtypes by the names recipes and config.json use ("float16", ...): their size in bytes, known without
importing torch (so `rlhf budget` stays quick), and the torch dtype, for loading and merging."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}


def torch_dtype(name: str) -> torch.dtype:
    """torch.float16 for "float16", and so on for each name in DTYPE_BYTES; KeyError for any other name."""
    import torch

    if name not in DTYPE_BYTES:
        raise KeyError(name)
    return getattr(torch, name)
