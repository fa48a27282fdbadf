"""Checkpoints of an RL step: everything `--resume` needs to continue exactly, written atomically.

RUN/<step>/checkpoints/step-N/ holds the trainable tensors (`adapter.safetensors`, e.g. `value_head.safetensors`),
the optimizer state and `state.json` (counters, controllers, and the settings the run was started with). Prompts and
sampling are functions of (seed, step, rank), so the step number is the data position and the RNG state at once.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from rlhf.errors import UserError
from rlhf.io import atomic_dir, atomic_write_json, recover_atomic_dirs

KEPT = 2

# Settings that cannot change the trajectory of a run: a resume may change them freely. Not `compile`: compiled and
# eager scoring differ by ~1e-4 in the log-probs, so a resume that switched would not continue the same run.
RESUMABLE_CHANGES = {"max_steps", "save_steps", "sample_every", "eval_prompts", "nonfinite_patience"}


def step_of(path: Path) -> int:
    try:
        return int(path.name.split("-")[-1])
    except ValueError:
        return -1


def saved_steps(directory: Path) -> list[Path]:
    return sorted(directory.glob("step-*"), key=step_of)


def save(
    directory: Path,
    step: int,
    tensors: dict[str, dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
) -> Path:
    """Write step-N (each `tensors` entry as NAME.safetensors) in one rename; keep the newest KEPT checkpoints."""
    path = directory / f"step-{step}"
    with atomic_dir(path) as tmp:
        for name, named in tensors.items():
            save_file({k: v.detach().cpu().contiguous() for k, v in named.items()}, str(tmp / f"{name}.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        atomic_write_json(tmp / "state.json", {"step": step, **state})
    for old in saved_steps(directory)[:-KEPT]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def remove_partial(directory: Path, adapter: Path) -> None:
    """After a save killed half-way: unfinished checkpoints and adapters go, and an adapter or checkpoint caught between
    atomic_dir's two renames gets its previous complete version back."""
    recover_atomic_dirs(directory, "step-*")
    recover_atomic_dirs(adapter.parent, adapter.name)


def load_newest(directory: Path, names: tuple[str, ...], warn) -> tuple[dict[str, dict[str, torch.Tensor]], dict, dict]:
    """(tensors by name, optimizer state, state.json) of the newest readable checkpoint; a damaged one is skipped."""
    candidates = saved_steps(directory)[::-1]
    if not candidates:
        raise UserError(f"--resume: no checkpoint in {directory}; run without --resume")
    for path in candidates:
        try:
            tensors = {name: load_file(str(path / f"{name}.safetensors")) for name in names}
            # weights_only: a checkpoint is data, never code.
            optimizer = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
            state = json.loads((path / "state.json").read_text())
        except Exception as exc:  # truncated or missing files: fall back to the one before
            warn(f"checkpoint {path.name} is unreadable ({type(exc).__name__}); trying the previous one")
            continue
        return tensors, optimizer, state
    raise UserError(f"--resume: every checkpoint in {directory} is damaged; start over with --force")


def changed_settings(saved: dict[str, Any], current: dict[str, Any], prefix: str) -> list[str]:
    """'KEY: OLD -> NEW' for each setting that differs (nested sections flattened to dotted keys), except those in
    RESUMABLE_CHANGES."""

    def flat(d: dict[str, Any], at: str) -> dict[str, Any]:
        out = {}
        for key, value in d.items():
            if isinstance(value, dict):
                out.update(flat(value, f"{at}{key}."))
            else:
                out[f"{at}{key}"] = value
        return out

    old, new = flat(saved, f"{prefix}."), flat(current, f"{prefix}.")
    changes = []
    for key in sorted(old.keys() | new.keys()):
        if key.split(".")[-1] in RESUMABLE_CHANGES and key.count(".") == 1:
            continue
        if old.get(key) != new.get(key):
            changes.append(f"{key}: {old.get(key)!r} -> {new.get(key)!r}")
    return changes
