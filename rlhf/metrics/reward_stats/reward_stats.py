"""Reward statistics of a set of generations: mean and spread of the reward, and the share judged positive."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Mean and standard deviation of per-sample rewards, and the positive rate (share of samples whose "
_DESCRIPTION += "reward model's top label is the target label)."
_INPUTS = """
Args:
    predictions: per-sample reward scores (float).
    references: 1 where the reward model's top label is the target label (e.g. POSITIVE), else 0.
Returns:
    mean_reward, std_reward, positive_rate, n.
"""


class RewardStats(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features(
                {"predictions": datasets.Value("float64"), "references": datasets.Value("int32")}
            ),
        )

    def _compute(self, predictions, references):
        scores = np.asarray(predictions, dtype=np.float64)
        positive = np.asarray(references, dtype=np.float64)
        return {
            "mean_reward": float(scores.mean()),
            "std_reward": float(scores.std(ddof=1)) if len(scores) > 1 else 0.0,
            "positive_rate": float(positive.mean()),
            "n": int(len(scores)),
        }
