"""Crash safety: `rlhf ppo` killed at random points and resumed ends exactly where an uninterrupted run ends.

SIGKILL gives the process no chance to clean up: whatever it was doing (generating, updating, appending a metrics
row, writing a checkpoint, saving the final adapter) stops mid-way. Every resume must still log each step exactly once
and reach the same adapter and value head as a run that was never interrupted. Ctrl-C (SIGINT) instead finishes the
step, saves a checkpoint for it and exits 130.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import cli
from safetensors.torch import load_file

from rlhf.io import read_jsonl

SMALL = ["ppo.batch_size=8", "ppo.mini_batch_size=4", "ppo.rollout_batch_size=8", "ppo.ppo_epochs=1",
         "ppo.eval_prompts=4", "ppo.max_steps=4"]  # fmt: skip
DETERMINISTIC = ("reward_mean", "reward_std", "kl", "kl_coef", "policy_loss", "value_loss", "entropy", "clipfrac",
                 "approx_kl", "response_len")  # fmt: skip
KILLS = 3
WAIT_S = 180


def _launch(run: Path, log: Path, *extra: str) -> subprocess.Popen:
    # conftest has put RLHF_CACHE, RLHF_RUNS and HF_HUB_OFFLINE=1 into this environment; the child inherits them.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    with open(log, "w") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "rlhf", "ppo", "--run", str(run), *SMALL, *extra],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=env,
        )


def _newest_checkpoint(run: Path) -> int:
    steps = [int(p.name.split("-")[1]) for p in (run / "ppo/checkpoints").glob("step-*")]
    return max(steps, default=0)


def _wait_until(proc: subprocess.Popen, log: Path, condition) -> bool:
    """True once `condition()` holds while the process runs; False if it exited first (it finished its work)."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc.poll() is not None:
            assert proc.returncode == 0, log.read_text()[-3000:]
            return False
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"no progress in {WAIT_S}s:\n{log.read_text()[-3000:]}")


def test_killed_and_resumed_equals_uninterrupted(merged_run, copy_run, tmp_path):
    straight = copy_run(merged_run, "straight")
    assert cli("ppo", "--run", straight, *SMALL, "ppo.save_steps=1") == 0

    run = copy_run(merged_run, "killed")
    log = tmp_path / "stderr.txt"

    # Ctrl-C once a step is logged: the step in flight is finished, checkpointed, and the exit code is 130. No
    # periodic checkpoints in this launch, so the one that exists afterwards is the one Ctrl-C made.
    proc = _launch(run, log, "ppo.save_steps=100")
    assert _wait_until(proc, log, lambda: len(read_jsonl(run / "ppo/metrics.jsonl")) >= 1)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(WAIT_S) == 130, log.read_text()[-3000:]
    assert "interrupted" in log.read_text()
    logged = read_jsonl(run / "ppo/metrics.jsonl")[-1]["step"]
    assert [p.name for p in (run / "ppo/checkpoints").iterdir()] == [f"step-{logged}"]

    # SIGKILL at seeded random moments: after each launch has saved a new checkpoint, somewhere in the next step, its
    # checkpoint, or (the last one) the final save and evaluation.
    rng = random.Random(7)
    for _ in range(KILLS):
        start = _newest_checkpoint(run)
        proc = _launch(run, log, "--resume", "ppo.save_steps=1")
        if not _wait_until(proc, log, lambda start=start: _newest_checkpoint(run) > start):
            break  # it finished before this kill; the final resume below then has nothing left to do
        time.sleep(rng.uniform(0.0, 0.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait(WAIT_S)

    proc = _launch(run, log, "--resume", "ppo.save_steps=1")
    assert proc.wait(WAIT_S) == 0, log.read_text()[-3000:]

    a, b = read_jsonl(straight / "ppo/metrics.jsonl"), read_jsonl(run / "ppo/metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4], "every step logged exactly once"
    for ra, rb in zip(a, b, strict=True):
        for key in DETERMINISTIC:
            assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-6), (ra["step"], key)
    for name in ("adapter_model.safetensors", "value_head.safetensors"):
        fa, fb = load_file(straight / "ppo/adapter" / name), load_file(run / "ppo/adapter" / name)
        assert fa.keys() == fb.keys()
        for key in fa:
            assert torch.allclose(fa[key], fb[key], atol=1e-6), (name, key)
    assert (run / "ppo/eval.json").is_file()
    assert not list((run / "ppo/checkpoints").glob(".*")), "no half-written checkpoint left behind"
