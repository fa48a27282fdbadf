"""DPO's maths: pure functions on the summed log-probs of each pair's chosen and rejected answers ([N] tensors each),
under the policy and under the reference.

The implicit reward of an answer is beta x (log pi(answer) - log pi_ref(answer)); DPO fits the Bradley-Terry model
of the preferences with it, so the loss is -log sigmoid(reward_chosen - reward_rejected). The variants follow trl
1.16's DPOTrainer (tests/test_dpo.py checks them against it on the same tensors), except that `sigmoid` also takes
`label_smoothing`, as conservative DPO (Mitchell 2023) and trl's sigmoid before 1.0 did: with label_smoothing 0 it is
trl's sigmoid exactly.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def dpo_losses(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_tokens: Tensor | None = None,
    rejected_tokens: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss per pair, implicit reward of chosen, of rejected; the rewards detached).

    sigmoid  -(1 - e) log sigmoid(beta m) - e log sigmoid(-beta m), m = chosen log-ratio - rejected log-ratio
    robust   (-(1 - e) log sigmoid(beta m) + e log sigmoid(-beta m)) / (1 - 2e): unbiased when a share e of the
             preferences is flipped (Chowdhury 2024)
    ipo      (m' - 1 / (2 beta))^2, m' the margin of the log-ratios each divided by its answer's token count
             (`chosen_tokens`, `rejected_tokens`), as trl does with the IPO authors' agreement
    """
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    margin = chosen_logratios - rejected_logratios
    e = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - e) * F.logsigmoid(beta * margin) - e * F.logsigmoid(-beta * margin)
    elif loss_type == "robust":
        losses = (-(1 - e) * F.logsigmoid(beta * margin) + e * F.logsigmoid(-beta * margin)) / (1 - 2 * e)
    elif loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("the ipo loss needs each answer's token count")
        per_token = chosen_logratios / chosen_tokens.clamp(min=1) - rejected_logratios / rejected_tokens.clamp(min=1)
        losses = (per_token - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss_type '{loss_type}': sigmoid, robust or ipo")
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def reward_stats(chosen_rewards: Tensor, rejected_rewards: Tensor) -> dict[str, float]:
    """The implicit rewards of a set of pairs: accuracy (chosen strictly higher: a tie orders nothing, so before
    training, when policy == reference and every reward is 0, it is 0), mean margin, mean of each side."""
    chosen, rejected = chosen_rewards.float(), rejected_rewards.float()
    return {
        "accuracy": (chosen > rejected).float().mean().item(),
        "margin_mean": (chosen - rejected).mean().item(),
        "chosen_reward": chosen.mean().item(),
        "rejected_reward": rejected.mean().item(),
    }


def kl_proxy(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor) -> Tensor:
    """Per sequence, the sum over answer tokens of k2 = (log pi - log pi_ref)^2 / 2 (>= 0, 0 while pi == ref).

    On samples from the policy it estimates KL(pi || ref) to second order; DPO's tokens are the data's, not the
    policy's, so it is a proxy of how far the policy has moved on them (the judged generation eval measures the KL on
    the policy's own samples). k2 rather than k3: k3's exp(ref - pi) explodes on the rejected answers DPO pushes down.
    """
    diff = (logprobs - ref_logprobs) * mask
    return (0.5 * diff.pow(2)).sum(-1)
