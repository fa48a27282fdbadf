"""Perplexity from per-document negative log-likelihoods: exp(total NLL / total predicted tokens).

Computed from NLLs the caller already has, so the model is run once, by the caller, the way it is being trained
(8-bit, adapter on) — not reloaded in fp32 as the hub's perplexity metric would.
"""

import math

import datasets
import evaluate

_INPUTS = """
Args:
    predictions: summed negative log-likelihood (nats) of each document's predicted tokens.
    references: number of predicted tokens in each document.
Returns:
    perplexity (token-weighted), mean_nll, n_tokens.
"""


class TokenPerplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Token-weighted perplexity from summed negative log-likelihoods.",
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features(
                {"predictions": datasets.Value("float64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references):
        tokens = sum(references)
        if tokens == 0:
            return {"perplexity": float("nan"), "mean_nll": float("nan"), "n_tokens": 0}
        mean_nll = sum(predictions) / tokens
        return {"perplexity": math.exp(mean_nll), "mean_nll": mean_nll, "n_tokens": int(tokens)}
