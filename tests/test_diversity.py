"""Diversity and fluency of responses (rlhf/diversity.py, rlhf/metrics/diversity, rlhf/metrics/token_perplexity),
checked on literal strings whose values are worked out by hand in the comments."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

import rlhf
from rlhf.diversity import collapse_warning, distinct_n, diversity, repetition_rate


def test_distinct_n_pools_ngrams_across_responses():
    # words a b a | a c: 5 unigrams, unique {a, b, c} = 3 -> 3/5 (unique per response would give (2 + 2)/5)
    assert distinct_n(["a b a", "a c"], 1) == pytest.approx(0.6)
    # bigrams (the film)(film was)(was good) | (the film)(film was)(was bad): 6, unique 4 -> 4/6
    assert distinct_n(["the film was good", "the film was bad"], 2) == pytest.approx(4 / 6)
    # n-grams stay inside a response: (a b) | (a b) -> 1 unique / 2 (joining the responses would add (b a): 2/3)
    assert distinct_n(["a b", "a b"], 2) == pytest.approx(0.5)


def test_distinct_n_lowercases_and_splits_on_any_whitespace():
    # great film | great film: 4 unigrams, unique {great, film} -> 2/4 (case kept: {Great, great, film} -> 3/4)
    assert distinct_n(["Great film", "great FILM"], 1) == pytest.approx(0.5)
    # a b | b a, whatever the whitespace: 4 unigrams, 2 unique (split(" ") would make "" and "b\ta" words)
    assert distinct_n(["a  b\n", "b\ta"], 1) == pytest.approx(0.5)


def test_distinct_n_short_and_empty_responses_add_no_ngrams():
    # "a" and "" have no bigram; "b c d" has (b c)(c d) -> 2 unique / 2
    assert distinct_n(["a", "", "b c d"], 2) == pytest.approx(1.0)
    assert distinct_n(["a", ""], 2) == 0.0
    assert distinct_n([], 1) == 0.0
    with pytest.raises(ValueError, match="n must be at least 1"):
        distinct_n(["a"], 0)


def test_repetition_rate_counts_responses_that_repeat_a_word_pair_within_themselves():
    texts = [
        "So good so GOOD",  # (so good)(good so)(so good): repeats, once lowercased
        "so good",  # one pair
        "the film the end",  # "the" twice but no pair twice
        "",  # nothing to repeat, still a response
    ]
    assert repetition_rate(texts) == pytest.approx(1 / 4)
    # with single words "the film the end" repeats too: 2 of 4
    assert repetition_rate(texts, n=1) == pytest.approx(2 / 4)
    # the same pair in two different responses is not a repetition within a response
    assert repetition_rate(["a b", "a b"]) == 0.0
    assert repetition_rate([]) == 0.0


def test_diversity_names_match_eval_json():
    # a b a | a c: distinct-1 3/5; bigrams (a b)(b a)(a c) all unique -> 1.0; no response repeats a pair
    assert diversity(["a b a", "a c"]) == {"distinct_1": pytest.approx(0.6), "distinct_2": 1.0, "repetition": 0.0}


def test_collapse_warning_below_point_eight_of_before():
    assert collapse_warning(0.57, 0.33) == "diversity collapsed: distinct-2 0.57 -> 0.33 (< 0.8x)"
    assert collapse_warning(0.5, 0.39) is not None
    assert collapse_warning(0.5, 0.4) is None  # exactly 0.8x is not below it
    assert collapse_warning(0.5, 0.6) is None
    assert collapse_warning(0.0, 0.0) is None  # nothing before to fall from


def _metric(name: str):
    import evaluate

    return evaluate.load(str(Path(rlhf.__file__).parent / "metrics" / name))


def test_evaluate_modules_load_offline_by_path():
    # the diversity module returns what rlhf.diversity computes (values as in test_diversity_names_match_eval_json)
    got = _metric("diversity").compute(predictions=["a b a", "a c"])
    assert got == {"distinct_1": pytest.approx(0.6), "distinct_2": 1.0, "repetition": 0.0, "n": 2}
    # reference perplexity of responses: summed NLLs 2.0 over 3 tokens and 1.0 over 1 token -> exp(3 / 4), token
    # weighted (the mean of per-response perplexities would be (e^(2/3) + e^1) / 2 = 2.33)
    got = _metric("token_perplexity").compute(predictions=[2.0, 1.0], references=[3, 1])
    assert got["perplexity"] == pytest.approx(math.exp(0.75))
    assert got["n_tokens"] == 4
