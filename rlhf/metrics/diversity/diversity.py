"""Diversity of a set of generated responses: distinct-1, distinct-2 and the share of responses that repeat a word
pair. The maths lives in rlhf.diversity, which the training loop also calls on each step's samples."""

import datasets
import evaluate

from rlhf.diversity import diversity

_INPUTS = """
Args:
    predictions: the decoded responses (text after the prompt), one per prompt.
Returns:
    distinct_1, distinct_2 (unique / total word n-grams across all responses; words are whitespace-split and
    lowercased), repetition (share of responses that repeat a word pair within themselves), n.
"""


class Diversity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Distinct-n (Li et al. 2016) and within-response repetition of generated responses.",
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features({"predictions": datasets.Value("string")}),
        )

    def _compute(self, predictions):
        return {**diversity(predictions), "n": len(predictions)}
