"""DPO settings on the quickstart, each judged over several sampling seeds: the eval's single seed moves the judged
positive rate by up to +-0.05 on 128 prompts, more than most differences between settings.

    python benchmarks/dpo_settings.py --base RUN --out /tmp/dpo-settings \
        "plain=dpo.beta=0.25 dpo.max_steps=200 dpo.lr_scheduler=constant dpo.label_smoothing=0 dpo.add_eos=true" \
        "shipped="

RUN is a finished `rlhf quickstart --algo dpo` run (its sft/ and merged/ are copied, so every setting starts from the
same merged model). Each setting is `NAME=KEY=VALUE ...` (recipe overrides on top of the quickstart recipe; empty:
the recipe as shipped), run as `rlhf dpo` in a fresh process. For each it prints a markdown row: held-out preference
accuracy (dpo/eval.json), then the judged positive rate at the eval's seed and at three more, and the shares of
generations judged positive, neutral (classifier score in (-1, 0]) and negative (<= -1) over all four seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

SEEDS = (12345, 1, 2, 3)  # 12345: the offset dpo.seed + 12345 the eval uses; three more draws of the same prompts


def judged(run: Path, adapter: bool = True, seeds=SEEDS) -> dict:
    """The finished run's adapter (or, adapter=False, the merged model alone: the fresh LoRA adds 0) generating for
    the eval's held-out prompts at each seed, judged by dpo.judge."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from rlhf.config import load_recipe
    from rlhf.dpo.trainer import DpoTrainer
    from rlhf.rl.rollout import collect
    from rlhf.rl.telemetry import Timer
    from rlhf.runs import Run

    trainer = DpoTrainer(load_recipe(str(run / "dpo/recipe.yaml")), Run(run), out=open(os.devnull, "w"))
    trainer.setup()
    if adapter:
        set_peft_model_state_dict(trainer.model, load_file(str(run / "dpo/adapter/adapter_model.safetensors")))
    batch = trainer.eval_prompts.draw(0, len(trainer.eval_texts))
    rates, shares = [], {"positive": 0, "neutral": 0, "negative": 0}
    for seed in seeds:
        cfg = trainer.cfg
        rollout = collect(trainer.gen_policy, trainer.tokenizer, trainer.judge, batch.tokens, cfg.generation,
                          cfg.rollout_batch_size, seed, Timer(), batch.rows, "prompt")  # fmt: skip
        positive = rollout.positive.tolist()
        rates.append(sum(positive) / len(positive))
        for score, pos in zip(rollout.scores.tolist(), positive):
            shares["positive" if pos else "negative" if score <= -1 else "neutral"] += 1
    n = sum(shares.values())
    return {"rates": rates, **{k: v / n for k, v in shares.items()}}


def _probe(run: Path, which: str, env: dict) -> dict:
    """judged() in a fresh process, as a user's would load the finished adapter."""
    command = [sys.executable, __file__, "--base", str(run), "--out", str(run), "--judge-only", which]
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True, help="a finished `rlhf quickstart --algo dpo` run")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("settings", nargs="+", help="NAME=KEY=VALUE KEY=VALUE ... (NAME= alone: as shipped)")
    parser.add_argument("--judge-only", action="store_true", help="(internal) print judged() of --base as JSON")
    parser.add_argument("--before", action="store_true", help="also judge --base's merged model before DPO")
    args = parser.parse_args()
    if args.judge_only:
        print(json.dumps(judged(args.base, adapter=args.settings != ["before"])))
        return
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    print(
        "| setting | held-out accuracy | positive (eval seed) | positive, 4 seeds | mean | pos / neutral / neg "
        "| KL | distinct-2 | reference ppl of responses | dpo wall |"
    )
    print("|---|---:|---:|---|---:|---|---:|---:|---|---:|")
    if args.before:
        j = _probe(args.base, "before", env)
        print(
            f"| before DPO | 0 | | {', '.join(f'{r:.3f}' for r in j['rates'])} | {sum(j['rates']) / 4:.3f} | "
            f"{j['positive']:.2f} / {j['neutral']:.2f} / {j['negative']:.2f} | 0 | | | |",
            flush=True,
        )
    for setting in args.settings:
        name, _, overrides = setting.partition("=")
        run = args.out / name
        shutil.rmtree(run, ignore_errors=True)
        run.mkdir(parents=True)
        for part in ("sft", "merged", "recipe.yaml"):
            (shutil.copytree if (args.base / part).is_dir() else shutil.copy)(args.base / part, run / part)
        started = time.monotonic()
        command = [sys.executable, "-m", "rlhf", "dpo", "--recipe", "quickstart", "--run", str(run), *overrides.split()]
        proc = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        wall = time.monotonic() - started
        if proc.returncode != 0:
            raise SystemExit(f"{name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        ev = json.loads((run / "dpo/eval.json").read_text())
        j = _probe(run, "after", env)
        rates = ", ".join(f"{r:.3f}" for r in j["rates"])
        print(f"| {name} | {ev['accuracy_after']:.3f} | {ev['positive_rate_after']:.3f} | {rates} | "
              f"{sum(j['rates']) / len(j['rates']):.3f} | {j['positive']:.2f} / {j['neutral']:.2f} / "
              f"{j['negative']:.2f} | {ev['kl_after']:.2f} | {ev['distinct_2_before']:.2f} -> "
              f"{ev['distinct_2_after']:.2f} | {ev['response_perplexity_before']:.1f} -> "
              f"{ev['response_perplexity_after']:.1f} | {wall:.0f} s |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
