"""The reward model's maths: pure functions on the scores of chosen and rejected answers ([N] tensors each).

Bradley-Terry: P(chosen preferred) = sigmoid(r_chosen - r_rejected), so the negative log-likelihood of the
preferences is -log sigmoid(r_chosen - r_rejected). A margin m asks for r_chosen - r_rejected > m before the loss
fades; the penalty, the mean squared score, keeps the scores near 0 (they are only defined up to a constant, and PPO
sees their scale).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def pairwise_loss(chosen: Tensor, rejected: Tensor, margin: float = 0.0, score_penalty: float = 0.0) -> Tensor:
    """mean(-log sigmoid(chosen - rejected - margin)) + score_penalty * mean over both sides of score^2."""
    loss = -F.logsigmoid(chosen - rejected - margin).mean()
    if score_penalty:
        loss = loss + score_penalty * torch.cat([chosen, rejected]).pow(2).mean()
    return loss


def accuracy(chosen: Tensor, rejected: Tensor) -> float:
    """Share of pairs whose chosen answer scores strictly higher: a tie counts as wrong, as it orders nothing."""
    return (chosen > rejected).float().mean().item()


def pair_stats(chosen: Tensor, rejected: Tensor) -> dict[str, float]:
    """What eval.json reports on a set of pairs: accuracy, mean margin (chosen - rejected), mean scores, the loss."""
    chosen, rejected = chosen.float(), rejected.float()
    return {
        "accuracy": accuracy(chosen, rejected),
        "margin_mean": (chosen - rejected).mean().item(),
        "chosen_mean": chosen.mean().item(),
        "rejected_mean": rejected.mean().item(),
        "loss": pairwise_loss(chosen, rejected).item(),
        "n_pairs": len(chosen),
    }
