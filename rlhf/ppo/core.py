"""PPO maths as small pure functions on tensors (what it shares with the other algorithms is in `rlhf.rl.core`).

Shapes: per-token tensors are [batch, response_len]; `mask` is 1.0 on real response tokens and 0.0 on padding.
Everything is computed in fp32 whatever the input dtype. Sign conventions: rewards and advantages are "higher is
better"; losses are to be minimised.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from rlhf.rl.core import kl_estimate, masked_mean, masked_whiten

KL_CONTROLLER_KINDS = ("adaptive", "fixed")


class RunningMoments:
    """Mean and variance of every value seen so far, merged batch by batch (Chan et al.'s parallel update).

    Kept in Python floats (float64) so that thousands of small batches do not drift, and so `state_dict()` is plain
    JSON-able data for checkpoints.
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0  # sum of squared deviations from the mean

    def update(self, x: Tensor) -> None:
        x = x.detach().double().flatten()
        n = x.numel()
        if n == 0:
            return
        batch_mean = float(x.mean())
        batch_m2 = float(((x - batch_mean) ** 2).sum())
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta**2 * self.count * n / total
        self.count = total

    @property
    def var(self) -> float:
        """Unbiased (n - 1) variance, matching `torch.var`; 0 before two values have been seen."""
        return self.m2 / (self.count - 1) if self.count > 1 else 0.0

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    def state_dict(self) -> dict[str, float | int]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])


class ScoreTransform:
    """Turns the reward model's score per sequence into the PPO score: normalise, then scale, then clip.

    Order: running normalisation first (it needs the raw scores' statistics), then the constant scale, then the clip,
    so that `clip` bounds exactly what PPO sees. The running statistics are updated with each batch before it is
    normalised, so the first batch is normalised by its own mean and std.
    """

    def __init__(
        self, clip: float | None = None, scale: float = 1.0, normalize: bool = False, shift_mean: bool = True
    ) -> None:
        if clip is not None and clip <= 0:
            raise ValueError(f"score clip ({clip}) must be positive or None")
        self.clip, self.scale, self.normalize, self.shift_mean = clip, scale, normalize, shift_mean
        self.moments = RunningMoments()

    def __call__(self, scores: Tensor) -> Tensor:
        scores = scores.float()
        if self.normalize:
            self.moments.update(scores)
            if self.shift_mean:
                scores = scores - self.moments.mean
            scores = scores / (self.moments.std + 1e-8)
        scores = scores * self.scale
        if self.clip is not None:
            scores = scores.clamp(-self.clip, self.clip)
        return scores

    def state_dict(self) -> dict[str, Any]:
        return {"moments": self.moments.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.moments.load_state_dict(state["moments"])


# ---------------------------------------------------------------------------------------------------------------------
# KL, rewards, advantages


def last_token_index(mask: Tensor) -> Tensor:
    """Index [B] of the last real token of each row; a ValueError if a row has none."""
    keep = mask.bool()
    if not bool(keep.any(dim=1).all()):
        raise ValueError("every row of the response mask needs at least one real token")
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(keep)
    return torch.where(keep, positions, -1).amax(dim=1)


def compute_rewards(
    scores: Tensor, logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, kl_coef: float, kl_kind: str = "k1"
) -> tuple[Tensor, Tensor]:
    """Per-token rewards [B, T] = -kl_coef * KL_t, plus `scores` [B] on each row's last real token; and the KL [B, T].

    The score judges the whole sequence, so it is paid once, when the sequence is complete: on the last real token
    (rows end at different places, so it is found from the mask). Padded positions get 0 reward and 0 KL.
    """
    keep = mask.bool()
    kl = torch.where(keep, kl_estimate(logprobs, ref_logprobs, kl_kind), 0.0)
    rewards = -kl_coef * kl
    last = last_token_index(mask).unsqueeze(1)
    rewards = rewards.scatter_add(1, last, scores.float().unsqueeze(1))
    return rewards, kl


def compute_gae(
    values: Tensor, rewards: Tensor, mask: Tensor, gamma: float, lam: float, whiten: bool = True
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimates and returns [B, T] over real tokens; padded positions get 0 for both.

    delta_t = r_t + gamma * V_next - V_t and A_t = delta_t + gamma * lam * A_next, where "next" is the next *real*
    token of the row (V_next = A_next = 0 after the last one: the episode ends there). Returns are the raw
    advantages plus values (the value head's target); with `whiten`, the advantages handed back are then whitened
    over the real tokens of the whole batch (`masked_whiten`), while the returns keep the unwhitened scale.
    """
    keep = mask.bool()
    values, rewards = values.float(), rewards.float()
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_adv = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        real = keep[:, t]
        # A padded position is skipped: it gets 0 and the recursion carries over it unchanged.
        advantages[:, t] = torch.where(real, adv, 0.0)
        next_value = torch.where(real, values[:, t], next_value)
        next_adv = torch.where(real, adv, next_adv)
    returns = torch.where(keep, advantages + values, 0.0)
    if whiten:
        advantages = masked_whiten(advantages, mask)
    return advantages, returns


# ---------------------------------------------------------------------------------------------------------------------
# Losses


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, cliprange_value: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """0.5 * masked_mean(max((v - R)^2, (clip(v, old - e, old + e) - R)^2)); stats: vf_clipfrac (detached).

    Clipping around the rollout's values keeps one PPO epoch from moving the value head far from where the
    advantages were computed, as the ratio clip does for the policy; taking the max makes it a pessimistic bound, so
    it can only slow a step, never reward moving away.
    """
    values = values.float()
    old_values, returns = old_values.detach().float(), returns.detach().float()
    values_clipped = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    unclipped = (values - returns).square()
    clipped = (values_clipped - returns).square()
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((clipped > unclipped).float(), mask)}
    return loss, stats


# ---------------------------------------------------------------------------------------------------------------------
# KL coefficient controllers


class AdaptiveKLController:
    """KL coefficient that steers the measured KL towards `target` (Ziegler et al. 2019, eq. 2).

    Each update moves the coefficient by at most 20% x n_steps / horizon, so one noisy batch cannot swing it.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError(f"adaptive KL needs target ({target}) and horizon ({horizon}) > 0")
        self.value, self.target, self.horizon = float(init_kl_coef), float(target), float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class FixedKLController:
    """Constant KL coefficient; `update` does nothing."""

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


def make_kl_controller(
    kind: str, init_kl_coef: float, target: float | None = None, horizon: float | None = None
) -> AdaptiveKLController | FixedKLController:
    """Controller by name: "adaptive" (needs `target` and `horizon`) or "fixed"."""
    if kind == "adaptive":
        if target is None or horizon is None:
            raise ValueError(f"adaptive KL control needs target ({target}) and horizon ({horizon})")
        return AdaptiveKLController(init_kl_coef, target, horizon)
    if kind == "fixed":
        return FixedKLController(init_kl_coef)
    raise ValueError(f"unknown KL controller kind {kind!r}; allowed: {', '.join(KL_CONTROLLER_KINDS)}")
