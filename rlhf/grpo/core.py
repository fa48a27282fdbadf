"""Critic-free RL maths as small pure functions on tensors: group advantages (GRPO, RLOO), the KL terms, the loss.

A batch holds `group_size` samples of each prompt in consecutive rows: rows [g * G, (g + 1) * G) are group g. Scores
are [B] (one per sequence); per-token tensors are [B, T] with `mask` 1.0 on real response tokens. Everything is
computed in fp32. Rewards and advantages are "higher is better"; losses are minimised.

GRPO (Shao et al. 2024, DeepSeekMath): A = (s - mean(group)) / (std(group) + eps), the KL to the reference as a k3
term per token in the loss. RLOO (Ahmadian et al. 2024): A = s - mean(the other samples of the group), the KL (k1,
summed over the sequence) subtracted from the score. The KL in the reward goes with RLOO only (the config refuses it
with GRPO's advantage, whose division by the group's spread would rescale beta per group); the KL in the loss with
either.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf.rl.core import exact_div, kl_estimate, masked_mean, policy_loss

ADVANTAGES = ("grpo", "rloo")

# Added to the group std before dividing, as trl 1.16 does: a group whose scores differ by float noise must not be
# blown up to +-1 advantages.
STD_EPS = 1e-4


def grouped(scores: Tensor, group_size: int) -> Tensor:
    """[B] -> [B / group_size, group_size] in fp32; a ValueError when the rows do not make whole groups."""
    exact_div(scores.shape[0], group_size, "rows / group_size")
    return scores.float().reshape(-1, group_size)


def _no_spread(groups: Tensor) -> Tensor:
    """[n_groups, 1] True where every score of the group is the same."""
    return (groups.amax(1, keepdim=True) == groups.amin(1, keepdim=True)).expand_as(groups)


def grpo_advantages(scores: Tensor, group_size: int, eps: float = STD_EPS) -> Tensor:
    """(s - group mean) / (group std + eps), std with Bessel's correction; exactly 0 for a group of equal scores (it
    says nothing about which sample is better, and float rounding of its mean must not pretend otherwise)."""
    if group_size < 2:
        raise ValueError(f"group_size ({group_size}) must be at least 2 for GRPO advantages")
    groups = grouped(scores, group_size)
    mean = groups.mean(1, keepdim=True)
    std = groups.std(1, keepdim=True)
    advantages = (groups - mean) / (std + eps)
    return torch.where(_no_spread(groups), 0.0, advantages).flatten()


def rloo_advantages(scores: Tensor, group_size: int) -> Tensor:
    """s - mean of the other samples of the group (the leave-one-out baseline: unbiased, since a sample's baseline does
    not depend on it); exactly 0 for a group of equal scores. Equals G / (G - 1) x (s - group mean)."""
    if group_size < 2:
        raise ValueError(f"group_size ({group_size}) must be at least 2 for RLOO advantages")
    groups = grouped(scores, group_size)
    others = (groups.sum(1, keepdim=True) - groups) / (group_size - 1)
    return torch.where(_no_spread(groups), 0.0, groups - others).flatten()


def group_advantages(scores: Tensor, group_size: int, kind: str) -> Tensor:
    if kind == "grpo":
        return grpo_advantages(scores, group_size)
    if kind == "rloo":
        return rloo_advantages(scores, group_size)
    raise ValueError(f"unknown advantage estimator {kind!r}; allowed: {', '.join(ADVANTAGES)}")


def group_stats(scores: Tensor, group_size: int) -> dict[str, float]:
    """The mean within-group std of the scores, and the share of groups whose scores are all equal: groups without
    spread teach nothing, so a share near 1 means the reward cannot tell the samples apart (or the policy collapsed)."""
    groups = grouped(scores, group_size)
    return {
        "group_reward_std": groups.std(1).mean().item(),
        "zero_spread_groups": _no_spread(groups)[:, 0].float().mean().item(),
    }


def sequence_kl(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor) -> Tensor:
    """[B] KL(policy || reference) of each sampled sequence: the k1 estimate logp - ref summed over real tokens."""
    return torch.where(mask.bool(), kl_estimate(logprobs, ref_logprobs, "k1"), 0.0).sum(1)


def kl_penalised_scores(scores: Tensor, logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, beta: float) -> Tensor:
    """The KL in the reward (RLOO): score - beta x sequence KL, with the sampling policy's log-probs (constants)."""
    return scores.float() - beta * sequence_kl(logprobs, ref_logprobs, mask)


def grpo_loss(
    logprobs: Tensor, old_logprobs: Tensor, ref_logprobs: Tensor, advantages: Tensor, mask: Tensor, cliprange: float,
    beta: float, entropy: Tensor | None = None, entropy_coef: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:  # fmt: skip
    """The clipped surrogate with each sequence's advantage on all its tokens, plus beta x the k3 KL per token:

        masked_mean(max(-A ratio, -A clip(ratio, 1 - e, 1 + e)) + beta k3(logp, ref))

    k3 = exp(ref - logp) - (ref - logp) - 1 is non-negative and, unlike k1, its gradient pulls towards the reference
    on every token. A token mean over the batch (trl's "bnpo"/"dapo" normalisation): long and short responses weigh
    per token, and micro-batches add up to the mini-batch's mean (`rlhf.rl.update`). beta = 0 leaves the KL out (the
    KL in the reward). With `entropy_coef` > 0, minus entropy_coef x the token-mean `entropy` [B, T] (a bonus).
    Gradients flow into `logprobs` (and `entropy`) only. Stats (detached): loss (what is optimised, every term),
    policy_loss, kl_loss (the mean k3), clipfrac, approx_kl, ratio.
    """
    per_token_advantages = advantages.float()[:, None].expand_as(mask)
    pg, stats = policy_loss(logprobs, old_logprobs, per_token_advantages, mask, cliprange)
    # The reference equals the policy at padding, as `policy_loss` zeroes its log-ratio there: no overflowing exp.
    ref_logprobs = torch.where(mask.bool(), ref_logprobs.float(), logprobs.detach().float())
    kl = masked_mean(kl_estimate(logprobs, ref_logprobs, "k3"), mask)
    loss = pg + beta * kl if beta else pg
    if entropy_coef > 0:  # higher entropy lowers the loss
        loss = loss - entropy_coef * masked_mean(entropy, mask)
    return loss, {"loss": loss.detach(), "policy_loss": pg.detach(), "kl_loss": kl.detach(), **stats}
