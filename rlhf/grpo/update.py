"""GRPO's optimisation of one scored rollout: `epochs` of the clipped loss with each sequence's group advantage on its
tokens (and beta x k3 when the KL is in the loss), through the shared update loop (`rlhf.rl.update.run_epochs`)."""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf.config import GrpoConfig
from rlhf.grpo import core
from rlhf.rl import update
from rlhf.rl.policy import Scored
from rlhf.rl.rollout import Rollout
from rlhf.rl.telemetry import Timer
from rlhf.rl.update import Optimisation

STATS = ("loss", "policy_loss", "kl_loss", "clipfrac", "approx_kl", "ratio")


def micro_batch_size(cfg: GrpoConfig) -> int:
    return update.micro_batch_size(cfg.mini_batch_size, cfg.gradient_accumulation_steps)


def optimise(
    rollout: Rollout, advantages: Tensor, opt: Optimisation, cfg: GrpoConfig, first_order: Tensor,
    generator: torch.Generator, timer: Timer,
) -> dict[str, float]:  # fmt: skip
    """`first_order` is the permutation of the first epoch (the rollout was scored in its micro-batches); later epochs
    draw theirs from `generator`."""
    mask = rollout.response_mask
    beta = cfg.beta if cfg.kl_in == "loss" else 0.0

    def loss_fn(out: Scored, idx: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        return core.grpo_loss(
            out.logprobs, rollout.logprobs[idx], rollout.ref_logprobs[idx], advantages[idx], mask[idx], cfg.cliprange,
            beta, out.entropy, cfg.entropy_coef,
        )  # fmt: skip

    return update.run_epochs(
        rollout, opt, loss_fn, STATS, epochs=cfg.epochs, mini_batch_size=cfg.mini_batch_size,
        micro=micro_batch_size(cfg), max_grad_norm=cfg.max_grad_norm, values=False, first_order=first_order,
        generator=generator, timer=timer, entropy=cfg.entropy_coef > 0,
    )  # fmt: skip
