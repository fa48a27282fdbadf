"""PPO's optimisation of one rollout: advantages, then `ppo_epochs` over shuffled mini-batches with clipped losses.

Per mini-batch: forward + backward per micro-batch (gradients accumulate; DDP all-reduces only after the last),
then one optimizer step, unless a loss or the gradient norm is not finite on some rank: then every rank drops that
mini-batch's update, so neither the adapter nor Adam's moments ever see a NaN.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from rlhf.config import PpoConfig
from rlhf.ppo import core
from rlhf.rl.parallel import Parallel
from rlhf.rl.rollout import Rollout, partition
from rlhf.rl.telemetry import Timer

STATS = ("policy_loss", "value_loss", "clipfrac", "approx_kl", "ratio", "vf_clipfrac", "grad_norm")


def micro_batch_size(cfg: PpoConfig) -> int:
    return core.exact_div(
        cfg.mini_batch_size, cfg.gradient_accumulation_steps, "mini_batch_size / gradient_accumulation_steps"
    )


@dataclass
class Optimisation:
    """What one PPO update needs besides the rollout: the DDP-wrapped policy (the gradient pass), its parameters."""

    module: nn.Module
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    parallel: Parallel


def optimise(
    rollout: Rollout, scores: Tensor, opt: Optimisation, cfg: PpoConfig, kl_coef: float, first_order: Tensor,
    generator: torch.Generator, timer: Timer,
) -> dict[str, float]:  # fmt: skip
    """Steps 4-5 on a scored rollout. `first_order` is the permutation of the first epoch (the rollout was scored in
    its micro-batches); later epochs draw theirs from `generator`."""
    mask = rollout.response_mask
    rewards, kl = core.compute_rewards(scores, rollout.logprobs, rollout.ref_logprobs, mask, kl_coef, cfg.kl_estimator)
    advantages, returns = core.compute_gae(
        rollout.values, rewards, mask, cfg.gamma, cfg.lam, whiten=cfg.whiten_advantages
    )

    n, micro = len(rollout.prompts), micro_batch_size(cfg)
    ids, attn, width_r = rollout.input_ids, rollout.attention_mask, rollout.response.shape[1]
    stats: dict[str, list[float]] = {k: [] for k in STATS}
    first: dict[str, list[float]] = {"ratio": [], "approx_kl": [], "clipfrac": []}
    t = time.perf_counter()
    skipped = applied = 0
    opt.module.train()
    for epoch in range(cfg.ppo_epochs):
        order = first_order if epoch == 0 else torch.randperm(n, generator=generator)
        for start in range(0, n, cfg.mini_batch_size):
            batches = partition(order[start : start + cfg.mini_batch_size], micro)
            tokens = mask[order[start : start + cfg.mini_batch_size].to(mask.device)].sum()
            opt.optimizer.zero_grad(set_to_none=True)
            finite = True
            for i, idx in enumerate(batches):
                idx = idx.to(ids.device)
                with opt.parallel.no_sync(opt.module, sync=i == len(batches) - 1):
                    out = opt.module(ids[idx], attn[idx], width_r, values=True, entropy=cfg.entropy_coef > 0)
                    m = mask[idx]
                    pg, pg_stats = core.policy_loss(
                        out.logprobs, rollout.logprobs[idx], advantages[idx], m, cfg.cliprange
                    )
                    vf, vf_stats = core.value_loss(
                        out.values, rollout.values[idx], returns[idx], m, cfg.cliprange_value
                    )
                    loss = pg + cfg.vf_coef * vf
                    if cfg.entropy_coef > 0:  # a bonus: higher entropy lowers the loss
                        loss = loss - cfg.entropy_coef * core.masked_mean(out.entropy, m)
                    # Each micro-batch's token mean, weighted by its share of the mini-batch's tokens: the sum is
                    # the mini-batch's token mean, so any gradient_accumulation_steps gives the same gradient.
                    loss = loss * (m.sum() / tokens)
                    # Decided together before any backward: DDP's all-reduce in the last backward needs every rank.
                    finite = opt.parallel.all_true(bool(torch.isfinite(loss)))
                    if not finite:
                        break
                    loss.backward()
                stats["policy_loss"].append(pg.item())
                stats["value_loss"].append(vf.item())
                stats["vf_clipfrac"].append(vf_stats["vf_clipfrac"].item())
                for key in ("clipfrac", "approx_kl", "ratio"):
                    stats[key].append(pg_stats[key].item())
                    if epoch == 0 and start == 0:
                        first[key].append(pg_stats[key].item())
            if finite:
                # After DDP's all-reduce every rank holds the same gradients, so the norm agrees; all_true anyway, a
                # finite loss can still give inf/nan gradients that would reach Adam's moments.
                norm = torch.nn.utils.clip_grad_norm_(opt.params, cfg.max_grad_norm or math.inf)
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
    # The first mini-batch of the first epoch sees the policy that sampled the rollout: its ratio must be 1.
    result.update({f"first_{k}": (sum(v) / len(v) if v else math.nan) for k, v in first.items()})
    result["kl"] = opt.parallel.mean((kl * mask).sum(1).mean().item())
    result["skipped_minibatches"] = skipped
    result["applied_minibatches"] = applied
    return result
