"""The whole flow on the offline fixtures: PPO and DPO reach their targets, and the run holds what users look at."""

from __future__ import annotations

import json

import pytest
from conftest import cli

from rlhf.io import read_jsonl

# PPO on the quickstart must move the tiny policy clearly: the held-out reward (a POSITIVE logit, whose spread
# across samples is ~2.5) must rise by at least 1.0, and at least 90% of held-out responses must read as positive
# (measured: 0.53 -> 0.98 in 50 steps).
REWARD_MARGIN = 1.0


def test_ppo_raises_reward_and_positive_rate(quickstart_run):
    ev = json.loads((quickstart_run / "ppo/eval.json").read_text())
    assert ev["reward_after"] > ev["reward_before"] + REWARD_MARGIN, ev
    assert ev["positive_rate_after"] >= 0.9, ev
    assert ev["positive_rate_before"] < 0.8, "the base must not already be positive, or the test shows nothing"
    assert ev["kl_before"] < 1e-3 < ev["kl_after"], "KL is zero before training and positive after"
    assert ev["n_prompts"] >= 64


def test_run_directory_contract(quickstart_run):
    run = quickstart_run
    for path in (
        "recipe.yaml",
        "sft/adapter/adapter_config.json",
        "sft/adapter/adapter_model.safetensors",
        "sft/metrics.jsonl",
        "merged/config.json",
        "ppo/adapter/adapter_config.json",
        "ppo/adapter/value_head.safetensors",
        "ppo/metrics.jsonl",
        "ppo/eval.json",
        "report.md",
    ):
        assert (run / path).is_file(), path
    assert len(list(run.glob("*.png"))) >= 2
    rows = read_jsonl(run / "ppo/metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    assert json.loads((run / "merged/config.json").read_text())["dtype"] == "float16"


@pytest.fixture(scope="module")
def dpo_quickstart_run(tmp_path_factory, fixture_paths):
    """One full `rlhf quickstart --algo dpo`: sft, merge, dpo with its held-out pairs and judged generations, report."""
    run = tmp_path_factory.mktemp("shared") / "quickstart-dpo"
    assert cli("quickstart", "--algo", "dpo", "--run", run) == 0
    return run


def test_dpo_quickstart_learns_the_preferences_and_turns_generations_positive(dpo_quickstart_run):
    # Measured (docs/benchmarks.md): held-out accuracy 0.94 on all 937 test pairs; judged positive 0.53 -> 0.875 at
    # the eval's seed, 0.78-0.875 (mean 0.83) over four sampling seeds; distinct-2 0.96x. The bounds leave room for
    # another CPU's rounding; the accuracy and perplexity bounds fail on the 200-step plain DPO this replaced (0.85;
    # the responses' reference perplexity 4.4 -> 15.8).
    ev = json.loads((dpo_quickstart_run / "dpo/eval.json").read_text())
    assert ev["accuracy_before"] == 0.0 and ev["accuracy_after"] >= 0.9, ev
    assert ev["n_pairs"] >= 900, "every held-out test pair, not a lucky few"
    assert ev["positive_rate_before"] < 0.6 and ev["positive_rate_after"] >= 0.8, ev
    assert ev["distinct_2_after"] >= 0.8 * ev["distinct_2_before"], ev
    assert ev["response_perplexity_after"] < 2 * ev["response_perplexity_before"], (
        "no drift into text the reference finds unlikely"
    )
    assert ev["n_prompts"] >= 128
    for path in ("dpo/adapter/adapter_model.safetensors", "dpo/metrics.jsonl", "dpo.png", "report.md"):
        assert (dpo_quickstart_run / path).is_file(), path
    assert "## DPO (rlhf dpo) on held-out pairs" in (dpo_quickstart_run / "report.md").read_text()
