"""PPO's optimisation of one rollout: per-token rewards and GAE advantages, then `ppo_epochs` of clipped policy and
value losses through the shared update loop (`rlhf.rl.update.run_epochs`: micro-batches, accumulation, the non-finite
guard)."""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf.config import PpoConfig
from rlhf.ppo import core
from rlhf.rl import update
from rlhf.rl.core import masked_mean, policy_loss
from rlhf.rl.policy import Scored
from rlhf.rl.rollout import Rollout
from rlhf.rl.telemetry import Timer
from rlhf.rl.update import Optimisation

STATS = ("policy_loss", "value_loss", "clipfrac", "approx_kl", "ratio", "vf_clipfrac")

__all__ = ["Optimisation", "micro_batch_size", "optimise"]


def micro_batch_size(cfg: PpoConfig) -> int:
    return update.micro_batch_size(cfg.mini_batch_size, cfg.gradient_accumulation_steps)


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

    def loss_fn(out: Scored, idx: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        m = mask[idx]
        pg, pg_stats = policy_loss(out.logprobs, rollout.logprobs[idx], advantages[idx], m, cfg.cliprange)
        vf, vf_stats = core.value_loss(out.values, rollout.values[idx], returns[idx], m, cfg.cliprange_value)
        loss = pg + cfg.vf_coef * vf
        if cfg.entropy_coef > 0:  # a bonus: higher entropy lowers the loss
            loss = loss - cfg.entropy_coef * masked_mean(out.entropy, m)
        return loss, {"policy_loss": pg, "value_loss": vf, **pg_stats, **vf_stats}

    result = update.run_epochs(
        rollout, opt, loss_fn, STATS, epochs=cfg.ppo_epochs, mini_batch_size=cfg.mini_batch_size,
        micro=micro_batch_size(cfg), max_grad_norm=cfg.max_grad_norm, values=True, first_order=first_order,
        generator=generator, timer=timer, entropy=cfg.entropy_coef > 0,
    )  # fmt: skip
    result["kl"] = opt.parallel.mean((kl * mask).sum(1).mean().item())
    return result
