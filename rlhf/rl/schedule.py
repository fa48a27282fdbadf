"""What a pairwise trainer (rlhf reward, rlhf dpo) does at optimizer step `step`, as functions of the step alone: its
learning rate and its pairs. So `--resume` from any checkpoint continues exactly as the uninterrupted run would."""

from __future__ import annotations

import torch


def learning_rate(step: int, peak: float, warmup_steps: int, scheduler: str, total_steps: int) -> float:
    """Linear warm-up to `peak`, then constant or linear decay to 0 at `total_steps`."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if scheduler == "constant":
        return peak
    remaining = (total_steps - step) / max(1, total_steps - warmup_steps)
    return peak * max(0.0, remaining)


def step_pairs(step: int, n: int, batch_size: int, accumulation: int, seed: int) -> list[list[int]]:
    """The micro-batches (indices of `n` training pairs) of optimizer step `step`: each epoch is a permutation drawn
    from (seed, epoch), so any step's pairs are known without replaying the ones before it."""
    per_step = batch_size * accumulation
    indices = []
    for j in range(per_step):
        epoch, pos = divmod(step * per_step + j, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        indices.append(int(order[pos]))
    return [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
