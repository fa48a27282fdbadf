"""Data parallel on two CPU processes: `accelerate launch -m rlhf sft|ppo` with gloo.

Each rank trains on its own data (SFT: transformers' DistributedSampler; PPO: rank-specific prompts), gradients are
averaged, and only rank 0 writes files and logs. On a machine without GPUs `accelerate launch --cpu` runs a single
process (or needs MPI), so the test launches with --multi_gpu, which starts torchrun; rlhf picks gloo without CUDA.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf.io import read_jsonl

pytestmark = pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate's launcher is not installed")

RECORDER = '''
import json
import math
import os


def score(texts):
    """Reward by length; record which rank scored which texts."""
    with open(os.environ["RLHF_TEST_RECORD"], "a") as f:
        f.write(json.dumps({"rank": int(os.environ.get("RANK", "0")), "texts": list(texts)}) + "\\n")
    return [len(t) / 100 for t in texts]
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(*args: str, env: dict | None = None, script: str | None = None) -> subprocess.CompletedProcess:
    target = [script] if script else ["-m", "rlhf"]
    command = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
               *target, *args]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def test_sft_on_two_processes(tmp_path, fixture_paths):
    run = tmp_path / "run"
    done = _launch(
        "sft", "--recipe", "quickstart", "--run", str(run), "sft.max_steps=3", "sft.batch_size=2", "sft.logging_steps=1"
    )
    rows = read_jsonl(run / "sft/metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3], "one writer: each step logged once"
    # Each rank reads its own half of the blocks (DistributedSampler), 2 a step: an epoch is half as many steps as
    # on one process.
    n_blocks = int(re.search(r"(\d+) blocks of", done.stderr).group(1))
    steps_per_epoch = math.ceil(math.ceil(n_blocks / 2) / 2)
    assert rows[-1]["epoch"] == pytest.approx(3 / steps_per_epoch)
    assert done.stdout.count("memory budget: sft") == 1 and done.stdout.count("sft: done") == 1
    assert (run / "sft/adapter/adapter_model.safetensors").is_file()


def test_ppo_on_two_processes(merged_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(merged_run, run, ignore=shutil.ignore_patterns("checkpoints"))
    (tmp_path / "recorder.py").write_text(RECORDER)
    spec = tmp_path / "recorder.yaml"
    spec.write_text("name: recorder\ntype: callable\ncallable: recorder:score\n")
    record = tmp_path / "scored.jsonl"
    done = _launch(
        "ppo",
        "--run",
        str(run),
        "--reward",
        str(spec),
        "ppo.batch_size=8",
        "ppo.mini_batch_size=4",
        "ppo.rollout_batch_size=8",
        "ppo.ppo_epochs=1",
        "ppo.eval_prompts=4",
        "ppo.max_steps=2",
        env={
            "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
            "RLHF_TEST_RECORD": str(record),
        },
    )
    # It finished: the check that both ranks hold the same weights after training (trainer.check_in_sync) passed.
    rows = read_jsonl(run / "ppo/metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2], "one writer: each step logged once"
    assert done.stdout.count("memory budget: ppo") == 1 and done.stdout.count("ppo: done") == 1
    assert sorted(p.name for p in (run / "ppo/checkpoints").iterdir()) == ["step-2"]
    assert (run / "ppo/adapter/value_head.safetensors").is_file() and (run / "ppo/eval.json").is_file()

    # Calls per rank: the evaluation before, one rollout per step, the evaluation after.
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    by_rank = {r: [c["texts"] for c in calls if c["rank"] == r] for r in (0, 1)}
    assert len(by_rank[0]) == len(by_rank[1]) == 4
    for step in (1, 2):
        ours, theirs = by_rank[0][step], by_rank[1][step]
        assert len(ours) == len(theirs) == 8, "each rank generates its own batch_size sequences"
        assert not set(ours) & set(theirs), "the ranks' prompts differ"
    assert by_rank[0][0] == by_rank[1][0], "the evaluation uses the same held-out prompts on every rank"


def test_gradient_is_the_global_token_mean(merged_run, tmp_path):
    """Through DDP each rank ends with the global token mean's gradient, for PPO (with and without the reentrant
    checkpointing of the gpt-neox-20b recipe) and GRPO, and logs every rank's update statistics: the plain mean of the
    ranks' token means, a sum, or a rank's own fail the checks in tests/dp_grad_check.py, which runs the real trainers'
    updates on both ranks (one launch for all three)."""
    run = tmp_path / "run"
    shutil.copytree(merged_run, run, ignore=shutil.ignore_patterns("checkpoints"))
    script = str(Path(__file__).with_name("dp_grad_check.py"))
    done = _launch(str(run), script=script, env={"PYTHONPATH": os.pathsep.join(sys.path)})
    for case in ("ppo", "ppo, reentrant checkpointing", "grpo"):
        line = f": {case}: gradient is the token-weighted mean of 2 ranks'"
        assert done.stdout.count(line) == 2, done.stdout + done.stderr[-3000:]
