"""How long `rlhf budget` and `--help` take to answer, from a fresh interpreter, as a user waits for them.

    python benchmarks/cli_latency.py                        # this checkout
    python benchmarks/cli_latency.py --tree OLD --tree .    # two checkouts, interleaved run by run

Each command runs --runs times per checkout in a new process (`python -m rlhf ...`, OMP_NUM_THREADS=1, offline),
interleaved so that a change in the machine's load hits every checkout alike; the table gives the median wall time
and whether the command imported torch (read from `python -X importtime`, once per command and checkout).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = {
    "rlhf budget --model gpt-neox-20b --gpu 24GiB": ["budget", "--model", "gpt-neox-20b", "--gpu", "24GiB"],
    "rlhf budget --model llama-3.1-8b --step all": ["budget", "--model", "llama-3.1-8b", "--step", "all"],
    "rlhf --help": ["--help"],
    "rlhf ppo --help": ["ppo", "--help"],
}


def run(tree: Path, args: list[str], importtime: bool = False) -> tuple[float, str]:
    env = os.environ | {"PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    flags = ["-X", "importtime"] if importtime else []
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, *flags, "-m", "rlhf", *args], cwd=tree, env=env, capture_output=True, text=True
    )
    wall = time.perf_counter() - start
    if out.returncode != 0:
        raise SystemExit(f"{tree}: rlhf {' '.join(args)} failed ({out.returncode}): {out.stderr[-2000:]}")
    return wall, out.stderr


def imports_torch(tree: Path, args: list[str]) -> bool:
    _, stderr = run(tree, args, importtime=True)
    return any(line.rstrip().endswith("| torch") for line in stderr.splitlines())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", action="append", type=Path, help="a checkout of rlhf (default: this one)")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    trees = [t.resolve() for t in (args.tree or [Path(__file__).resolve().parents[1]])]
    walls: dict[tuple[str, Path], list[float]] = {(c, t): [] for c in COMMANDS for t in trees}
    for _ in range(args.runs):
        for name, argv in COMMANDS.items():
            for tree in trees:
                walls[name, tree].append(run(tree, argv)[0])
    head = ["command", *(f"{t.name}: median s (runs)" for t in trees), *(f"{t.name}: torch" for t in trees)]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for name, argv in COMMANDS.items():
        times = [
            f"{statistics.median(walls[name, t]):.2f} ({', '.join(f'{w:.1f}' for w in walls[name, t])})" for t in trees
        ]
        torch = ["yes" if imports_torch(t, argv) else "no" for t in trees]
        print(f"| `{name}` | " + " | ".join(times + torch) + " |")


if __name__ == "__main__":
    main()
