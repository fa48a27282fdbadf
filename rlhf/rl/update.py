"""The clipped-update loop every RL step shares: `epochs` over shuffled mini-batches of a scored rollout.

Per mini-batch: forward + backward per micro-batch (gradients accumulate; DDP all-reduces only after the last),
then one optimizer step, unless a loss or the gradient norm is not finite on some rank: then every rank drops that
mini-batch's update, so neither the adapter nor Adam's moments ever see a NaN. What the loss is belongs to the
algorithm (`rlhf.ppo.update`, `rlhf.grpo.update`); it arrives here as a function of the micro-batch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from rlhf.rl import core
from rlhf.rl.parallel import Parallel
from rlhf.rl.policy import Scored
from rlhf.rl.rollout import Rollout, partition
from rlhf.rl.telemetry import Timer

# Logged for the first mini-batch of the first epoch too: it sees the policy that sampled, so its ratio must be 1.
FIRST = ("ratio", "approx_kl", "clipfrac")

# loss_fn(forward pass of the micro-batch, its row indices) -> (the micro-batch's token-mean loss, detached stats)
LossFn = Callable[[Scored, Tensor], tuple[Tensor, dict[str, Tensor]]]


def micro_batch_size(mini_batch_size: int, gradient_accumulation_steps: int) -> int:
    return core.exact_div(mini_batch_size, gradient_accumulation_steps, "mini_batch_size / gradient_accumulation_steps")


@dataclass
class Optimisation:
    """What one update needs besides the rollout: the DDP-wrapped policy (the gradient pass), its parameters."""

    module: nn.Module
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    parallel: Parallel


def run_epochs(
    rollout: Rollout, opt: Optimisation, loss_fn: LossFn, stat_keys: tuple[str, ...], *, epochs: int,
    mini_batch_size: int, micro: int, max_grad_norm: float | None, values: bool, first_order: Tensor,
    generator: torch.Generator, timer: Timer, entropy: bool = False,
) -> dict[str, float]:  # fmt: skip
    """`epochs` passes over the rollout in mini-batches; the mean of each stat (and `grad_norm`), `first_*` of the
    first mini-batch, and the counts of applied and skipped mini-batches. `first_order` is the first epoch's
    permutation (the rollout was scored in its micro-batches); later epochs draw theirs from `generator`. `values`,
    `entropy`: whether the forward pass computes them (with grad) for `loss_fn`."""
    mask = rollout.response_mask
    n = len(rollout.prompts)
    ids, attn, width_r = rollout.input_ids, rollout.attention_mask, rollout.response.shape[1]
    stats: dict[str, list[float]] = {k: [] for k in (*stat_keys, "grad_norm")}
    first: dict[str, list[float]] = {k: [] for k in FIRST}
    t = time.perf_counter()
    skipped = applied = 0
    opt.module.train()
    for epoch in range(epochs):
        order = first_order if epoch == 0 else torch.randperm(n, generator=generator)
        for start in range(0, n, mini_batch_size):
            batches = partition(order[start : start + mini_batch_size], micro)
            # The mini-batch's response tokens over every rank: DDP averages the ranks' gradients, so each rank
            # weighs its micro-batches by world_size / the global count, and the average is the global token mean.
            local = float(mask[order[start : start + mini_batch_size].to(mask.device)].sum())
            scale = opt.parallel.world_size / opt.parallel.sum(local)
            opt.optimizer.zero_grad(set_to_none=True)
            finite = True
            for i, idx in enumerate(batches):
                idx = idx.to(ids.device)
                with opt.parallel.no_sync(opt.module, sync=i == len(batches) - 1):
                    out = opt.module(ids[idx], attn[idx], width_r, values=values, entropy=entropy)
                    loss, mb_stats = loss_fn(out, idx)
                    # Each micro-batch's token mean, weighted by its share of the mini-batch's tokens: the sum is
                    # the mini-batch's token mean, so any gradient_accumulation_steps gives the same gradient.
                    loss = loss * (mask[idx].sum() * scale)
                    # Decided together before any backward: DDP's all-reduce in the last backward needs every rank.
                    finite = opt.parallel.all_true(bool(torch.isfinite(loss)))
                    if not finite:
                        break
                    loss.backward()
                for key in stat_keys:
                    stats[key].append(mb_stats[key].item())
                    if epoch == 0 and start == 0 and key in first:
                        first[key].append(mb_stats[key].item())
            if finite:
                # After DDP's all-reduce every rank holds the same gradients, so the norm agrees; all_true anyway, a
                # finite loss can still give inf/nan gradients that would reach Adam's moments.
                norm = torch.nn.utils.clip_grad_norm_(opt.params, max_grad_norm or math.inf)
                finite = opt.parallel.all_true(bool(torch.isfinite(norm)))
            if not finite:
                skipped += 1
                opt.optimizer.zero_grad(set_to_none=True)
                continue
            stats["grad_norm"].append(float(norm))
            opt.optimizer.step()
            applied += 1
    opt.optimizer.zero_grad(set_to_none=True)
    timer.add("train", t)
    result = {k: (sum(v) / len(v) if v else math.nan) for k, v in stats.items()}
    result.update({f"first_{k}": (sum(v) / len(v) if v else math.nan) for k, v in first.items()})
    result = opt.parallel.means(result)  # every rank's mini-batches, not rank 0's alone
    result["skipped_minibatches"] = skipped
    result["applied_minibatches"] = applied
    return result
