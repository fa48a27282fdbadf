"""`rlhf grpo` end to end on the tiny 8-bit fixtures: outputs beside PPO's, exact resume, bad input, reward rising."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import cli
from safetensors.torch import load_file

from rlhf.io import read_jsonl
from rlhf.runs import Run

SMALL = ["grpo.batch_size=4", "grpo.group_size=4", "grpo.mini_batch_size=8", "grpo.rollout_batch_size=16",
         "grpo.epochs=2", "grpo.eval_prompts=8", "grpo.save_steps=1", "grpo.sample_every=1"]  # fmt: skip
DETERMINISTIC = ("reward_mean", "reward_std", "group_reward_std", "zero_spread_groups", "kl", "loss", "policy_loss",
                 "kl_loss", "clipfrac", "approx_kl", "ratio", "entropy", "response_len")  # fmt: skip


def _grpo(run, *extra):
    return cli("grpo", "--recipe", "quickstart", "--reward", "quickstart-sentiment", "--run", run, *SMALL, *extra)


def test_resume_continues_exactly(merged_run, copy_run):
    """Straight for 4 steps == 2 steps, stopped, then resumed to 4: the same metrics and the same adapter."""
    straight = copy_run(merged_run, "straight")
    assert _grpo(straight, "grpo.max_steps=4") == 0
    split = copy_run(merged_run, "split")
    assert _grpo(split, "grpo.max_steps=2") == 0
    assert _grpo(split, "grpo.max_steps=4", "--resume") == 0

    a, b = read_jsonl(straight / "grpo/metrics.jsonl"), read_jsonl(split / "grpo/metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    assert a[2]["reward_mean"] != a[1]["reward_mean"], "steps differ, or the comparison proves nothing"
    for ra, rb in zip(a, b):
        for key in DETERMINISTIC:
            assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-6), (ra["step"], key)
    fa = load_file(straight / "grpo/adapter/adapter_model.safetensors")
    fb = load_file(split / "grpo/adapter/adapter_model.safetensors")
    assert fa.keys() == fb.keys() and all(torch.allclose(fa[k], fb[k], atol=1e-6) for k in fa)


def test_rloo_with_kl_in_the_reward_writes_what_ppo_writes(merged_run, copy_run):
    """The other estimator and KL placement, through the same outputs: an adapter without a value head, metrics with
    the group statistics, samples, and an eval.json with exactly PPO's keys."""
    run = copy_run(merged_run)
    merged_before = (run / "merged/model.safetensors").read_bytes()
    assert _grpo(run, "grpo.max_steps=2", "grpo.advantage=rloo", "grpo.kl_in=reward", "grpo.beta=0.1") == 0
    assert (run / "merged/model.safetensors").read_bytes() == merged_before, "the base is never written"
    adapter = Run(run).grpo_adapter
    assert sorted(p.name for p in adapter.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    weights = load_file(adapter / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in weights.items()), "the policy adapter was trained"
    assert "no value head" in (adapter / "README.md").read_text()
    assert [p.name for p in Run(run).grpo_checkpoints.iterdir()] == ["step-1", "step-2"]
    rows = read_jsonl(run / "grpo/metrics.jsonl")
    for key in ("reward_mean", "reward_std", "positive_rate", "kl", "kl_coef", "loss", "policy_loss", "clipfrac",
                "ratio", "first_ratio", "group_reward_std", "zero_spread_groups", "tokens_per_s", "generate_share",
                "peak_mem_bytes", "time_generate", "time_reward", "time_forward", "time_train"):  # fmt: skip
        assert key in rows[-1], key
    assert rows[0]["first_ratio"] == pytest.approx(1.0, abs=1e-4), "the first mini-batch sees the sampling policy"
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6), "the first rollout is sampled by the reference itself"
    samples = read_jsonl(run / "grpo/samples.jsonl")
    assert len({s["prompt"] for s in samples if s["step"] == 1}) == 4, "one sample per prompt, not one group"

    assert cli("ppo", "--recipe", "quickstart", "--run", run, "ppo.batch_size=8", "ppo.mini_batch_size=8",
               "ppo.ppo_epochs=1", "ppo.eval_prompts=8", "ppo.max_steps=1") == 0  # fmt: skip
    grpo_eval = json.loads((run / "grpo/eval.json").read_text())
    assert grpo_eval.keys() == json.loads((run / "ppo/eval.json").read_text()).keys()
    assert grpo_eval["kl_before"] == pytest.approx(0.0, abs=1e-4), "before training the policy is the reference"
    # A second run without --resume/--force is refused.
    assert _grpo(run, "grpo.max_steps=2") == 2


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["grpo.group_size=1"], "group_size (1) must be at least 2 with advantage=grpo"),
        (["grpo.group_size=1", "grpo.advantage=rloo", "grpo.mini_batch_size=4"], "group_size (1) must be at least 2"),
        (
            ["grpo.mini_batch_size=6"],
            "batch_size x group_size (4 x 4 = 16 sequences) must be exactly divisible by mini_batch_size (6)",
        ),  # fmt: skip
    ],
)
def test_bad_group_or_batch_is_one_line_exit_2(merged_run, copy_run, capsys, overrides, fragment):
    run = copy_run(merged_run)
    assert _grpo(run, *overrides) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rlhf: error:") and fragment in err[0], err
    assert not (run / "grpo").exists(), "a rejected command writes nothing"


def test_reward_rises(merged_run, copy_run):
    """The quickstart's GRPO settings, shortened to 12 steps: the batch reward climbs and the held-out one follows."""
    run = copy_run(merged_run)
    assert cli("grpo", "--recipe", "quickstart", "--run", run, "grpo.max_steps=12", "grpo.eval_prompts=32") == 0
    rewards = [r["reward_mean"] for r in read_jsonl(run / "grpo/metrics.jsonl")]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.5, rewards
    ev = json.loads((run / "grpo/eval.json").read_text())
    assert ev["reward_after"] > ev["reward_before"] + 0.5 and ev["positive_rate_after"] > ev["positive_rate_before"]


def test_over_optimisation_guards_name_grpo_settings():
    """PPO's early stops (KL ceiling, diversity floor) guard GRPO too, and say which setting fired."""
    from types import SimpleNamespace

    from rlhf.config import GrpoConfig
    from rlhf.grpo.trainer import GRPOTrainer

    trainer = SimpleNamespace(cfg=GrpoConfig(kl_ceiling=5.0, diversity_floor=0.5))
    assert GRPOTrainer._guard(trainer, {"step": 1, "kl": 0.0, "distinct_2": 0.6}) is None
    assert "grpo.kl_ceiling 5" in GRPOTrainer._guard(trainer, {"step": 2, "kl": 6.0, "distinct_2": 0.6})
    assert "grpo.diversity_floor 0.5" in GRPOTrainer._guard(trainer, {"step": 3, "kl": 1.0, "distinct_2": 0.2})
