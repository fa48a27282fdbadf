"""Diversity of generated responses: the numbers that show a policy collapsing onto one template.

A reward model can be satisfied by one phrase, and PPO finds it: reward rises while every prompt gets the same few
words. These pure functions measure that on decoded response texts (cheap enough to call on every PPO step):

- `distinct_n`: unique n-grams / all n-grams across the responses (Li et al. 2016, "A Diversity-Promoting Objective
  Function for Neural Conversation Models") — falls when responses share their wording;
- `repetition_rate`: share of responses that repeat a word pair within themselves — rises when a policy loops.

Words are the response split on whitespace and lowercased ("Great" and "great" are one word; "great." and "great"
are two): a model-independent unit, so runs with different tokenizers compare.
Fluency (the reference model's perplexity of the responses) comes from rlhf/metrics/token_perplexity.
"""

from __future__ import annotations

from collections.abc import Sequence

# distinct-2 after training below this share of its value before is reported as a collapse
COLLAPSE_RATIO = 0.8


def words(text: str) -> list[str]:
    return text.lower().split()


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct-n of a set of responses: unique n-grams across all of them / total n-grams in all of them.

    Words are whitespace-split and lowercased. A response shorter than n words adds no n-gram; 0.0 when there is no
    n-gram at all. The value falls as more responses are pooled, so compare it between sets of the same size.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    pooled = [g for text in texts for g in ngrams(words(text), n)]
    return len(set(pooled)) / len(pooled) if pooled else 0.0


def repetition_rate(texts: Sequence[str], n: int = 2) -> float:
    """Share of responses in which some n-gram of words (whitespace-split, lowercased) occurs more than once.

    n = 2 by default because responses here are 4-16 tokens (a dozen words at most): a repeated single word is
    ordinary English ("the film ... the end"), a repeated 3-gram takes six of those words and flags only the worst
    loops, while a repeated word pair ("so good so good") is the first sign of one. 0.0 for no responses.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if not texts:
        return 0.0
    repeating = 0
    for text in texts:
        grams = ngrams(words(text), n)
        repeating += len(set(grams)) < len(grams)
    return repeating / len(texts)


def diversity(texts: Sequence[str]) -> dict[str, float]:
    """The diversity numbers of one set of responses, under the names eval.json uses (without _before/_after)."""
    return {
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "repetition": repetition_rate(texts),
    }


def collapse_warning(distinct_2_before: float, distinct_2_after: float) -> str | None:
    """One line when distinct-2 fell below COLLAPSE_RATIO of its value before training; None otherwise."""
    if distinct_2_before > 0 and distinct_2_after < COLLAPSE_RATIO * distinct_2_before:
        return (
            f"diversity collapsed: distinct-2 {distinct_2_before:.2f} -> {distinct_2_after:.2f} (< {COLLAPSE_RATIO:g}x)"
        )
    return None
