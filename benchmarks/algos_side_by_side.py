"""PPO, GRPO, PPO on a learned reward, and DPO side by side: each `rlhf quickstart` variant on the same fixtures, one
after another, with the held-out numbers every one of them writes and the wall time and peak memory of its process.

    python benchmarks/algos_side_by_side.py --out /tmp/side          # all four; prints a markdown table
    python benchmarks/algos_side_by_side.py --out /tmp/side --only dpo

Each variant is a fresh `python -m rlhf quickstart ...` under /usr/bin/time -v (peak RSS: the whole process, the
classifier and evaluation included), OMP_NUM_THREADS=1, offline, fixtures from $RLHF_CACHE (built by the first run if
missing: run once before measuring). Positive rate is the sentiment classifier's verdict on 128 held-out prompts'
generations for every variant (for PPO on the learned reward and DPO the classifier only judges).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {
    "ppo": ("PPO (classifier reward)", ["--algo", "ppo"], "ppo"),
    "grpo": ("GRPO (classifier reward)", ["--algo", "grpo"], "grpo"),
    "reward-model": ("PPO on a learned reward (rlhf reward first)", ["--reward-model"], "ppo"),
    "dpo": ("DPO on the preference pairs", ["--algo", "dpo"], "dpo"),
}


def measure(name: str, out: Path) -> dict:
    label, flags, step = VARIANTS[name]
    run = out / name
    shutil.rmtree(run, ignore_errors=True)
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    command = ["/usr/bin/time", "-v", sys.executable, "-m", "rlhf", "quickstart", "--run", str(run), *flags]
    started = time.monotonic()
    proc = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    wall = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    rss_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    printed = re.search(r"quickstart done in (\d+)s wall \((.*)\)", proc.stdout)
    ev = json.loads((run / step / "eval.json").read_text())
    rows = [json.loads(line) for line in (run / step / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {
        "name": name,
        "label": label,
        "positive_rate_before": ev["positive_rate_before"],
        "positive_rate_after": ev["positive_rate_after"],
        "kl_after": ev["kl_after"],
        "distinct_2_before": ev["distinct_2_before"],
        "distinct_2_after": ev["distinct_2_after"],
        "perplexity_after": ev.get("perplexity_after"),
        "accuracy_after": ev.get("accuracy_after"),  # DPO: held-out preference accuracy
        "steps": ev.get("steps"),
        "step_seconds": sum(r.get("time_step", 0.0) for r in rows),
        "quickstart_s": int(printed.group(1)) if printed else None,
        "phases": printed.group(2) if printed else "",
        "process_s": wall,
        "peak_rss_mib": rss_kib / 1024,
        "peak_mem_logged_mib": max((r.get("peak_mem_bytes", 0) for r in rows), default=0) / 2**20,
    }


def table(results: list[dict]) -> str:
    lines = [
        "| variant | positive rate | KL to reference | distinct-2 (x before) | perplexity after | steps | quickstart "
        "(as printed) | peak RSS |",
        "|---|---|---:|---|---:|---:|---|---:|",
    ]
    for r in results:
        ratio = r["distinct_2_after"] / r["distinct_2_before"] if r["distinct_2_before"] else float("nan")
        lines.append(
            f"| {r['label']} | {r['positive_rate_before']:.2f} -> {r['positive_rate_after']:.2f} | {r['kl_after']:.2f} "
            f"| {r['distinct_2_before']:.2f} -> {r['distinct_2_after']:.2f} ({ratio:.2f}x) | "
            f"{r['perplexity_after']:.2f} | {r['steps']} | {r['quickstart_s']} s ({r['phases']}) | "
            f"{r['peak_rss_mib']:.0f} MiB |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="where the runs go (each variant's subdirectory)")
    parser.add_argument("--only", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.only:
        print(f"{name} ...", file=sys.stderr, flush=True)
        results.append(measure(name, args.out))
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(table(results))


if __name__ == "__main__":
    main()
