"""`rlhf quickstart --task arithmetic`: SFT on prompt/completion pairs, then RL on a reward that checks each answer
against its row, raises held-out accuracy; PPO on the same merged model raises it too."""

from __future__ import annotations

import json

from conftest import cli

from rlhf.io import read_jsonl

# Held-out accuracy (sampled at the step's settings) RL must add. Measured on 256 test prompts, 2026-12-07: GRPO
# 0.46 -> 0.75 (the bar: +0.25), PPO 0.46 -> 0.79, +0.20 to +0.33 over 3 seeds
# (docs/benchmarks.md, "The arithmetic task").
GRPO_GAIN = 0.25
PPO_GAIN = 0.1


def test_grpo_raises_held_out_accuracy(arithmetic_run):
    ev = json.loads((arithmetic_run / "grpo/eval.json").read_text())
    assert ev["accuracy_after"] >= ev["accuracy_before"] + GRPO_GAIN, ev
    assert 0.2 <= ev["accuracy_before"] <= 0.6, "SFT must leave the model partly right, or the test shows nothing"
    assert ev["accuracy_greedy_before"] > ev["accuracy_before"], (
        "SFT's greedy answer is right more often: room to learn"
    )
    assert ev["n_prompts"] >= 200


def test_task_run_directory(arithmetic_run):
    for path in ("sft/adapter/adapter_model.safetensors", "merged/config.json", "grpo/adapter/adapter_config.json",
                 "grpo/eval.json", "report.md"):  # fmt: skip
        assert (arithmetic_run / path).is_file(), path
    # SFT trained on the completions alone: its log says how many of the pairs' tokens counted, and few did.
    rows = read_jsonl(arithmetic_run / "sft/metrics.jsonl")
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_ppo_raises_held_out_accuracy_too(arithmetic_run, copy_run):
    run = copy_run(arithmetic_run)
    assert cli("ppo", "--recipe", "arithmetic", "--run", run, "--reward", "arithmetic") == 0
    ev = json.loads((run / "ppo/eval.json").read_text())
    assert ev["accuracy_after"] >= ev["accuracy_before"] + PPO_GAIN, ev
