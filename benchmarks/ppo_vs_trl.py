"""A PPO step of `rlhf ppo` beside trl 0.11.4's PPOTrainer (the blog's trainer), side by side and interleaved.

    bash benchmarks/ppo_vs_trl.sh [--scales quickstart random-105m] [--rounds 2] [--steps 4] [--no-write]
    (= python benchmarks/ppo_vs_trl.py --trl-python VENV/bin/python ..., the wrapper builds VENV once)

Four sides, each in its own process (so peaks do not mix), on the same inputs:
  rlhf               `PPOTrainer.ppo_step()`: the trainer's own rollout, scoring and update
  rlhf-compile       the same with `ppo.compile: true` (its warm-up step compiles; reported apart)
  trl batched        trl 0.11.4: `ppo_trainer.generate(queries, batch_size=B)` -> sentiment pipeline ->
                     `ppo_trainer.step` (benchmarks/trl_0114_side.py, in its own venv)
  trl one-at-a-time  the same, generating one query at a time as the blog's loop does

Same model, classifier, prompts and settings on every side: batch 16, mini-batch 4, 4 PPO epochs, LoRA r=16 (alpha
32, no dropout) on query_key_value, adaptive KL from 0.2 (target 6), lr 1.41e-5, responses of exactly 16 tokens
(trl: min_new_tokens = max_new_tokens; rlhf: min = max, not stopping at EOS), prompts of 2-8 tokens cut from the
IMDB fixture's reviews, reward = the tiny DistilBERT's POSITIVE logit. Unquantized float32 on both sides: 8-bit is
not possible with transformers 4.46.3 beside bitsandbytes 0.50, and fp32 is the quickstart recipe's CPU dtype.
Scales:
  quickstart    fixture:tiny-gpt-neox (the quickstart's model: 0.4 M parameters, hidden 64, 4 layers)
  random-105m   a GPT-NeoX with random weights, hidden 1024, 8 layers, 16 heads, the fixture's 2,048-token vocabulary
                and tokenizer (105 M parameters): where compute, not overhead, decides

Interleaving: `rounds` rounds; in each, every side runs in a fresh process for 1 warm-up step + `steps` measured
ones, the sides in turn, so the machine's load falls on all alike. Per side: the median seconds per step over all
measured steps, response tokens/s, the split (generate / reward / forward passes / update), and peak RSS (VmHWM of
the whole process, the largest over its rounds). The table goes into docs/benchmarks.md, section "## PPO step
beside trl 0.11.4".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
SECTION = "## PPO step beside trl 0.11.4"
SIDES = ("rlhf", "rlhf-compile", "trl-batched", "trl-one-at-a-time")
SETTINGS = {
    "batch_size": 16,
    "mini_batch_size": 4,
    "ppo_epochs": 4,
    "new_tokens": 16,
    "prompt_min_tokens": 2,
    "prompt_max_tokens": 8,
    "learning_rate": 1.41e-5,
    "init_kl_coef": 0.2,
    "target_kl": 6.0,
    "kl_horizon": 10000,
    "max_grad_norm": None,
    "lora_rank": 16,
    "lora_alpha": 32,
    "target_modules": ["query_key_value"],
    "dtype": "float32",
    "reward_batch_size": 64,
    "warmup": 1,
    "steps": 4,
}
RANDOM_105M = {
    "hidden_size": 1024,
    "num_hidden_layers": 8,
    "num_attention_heads": 16,
    "intermediate_size": 4096,
    "vocab_size": 2048,
    "max_position_embeddings": 256,
}


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


# --- inputs -------------------------------------------------------------------------------------------------------


def build_inputs(work: Path, scales: list[str], settings: dict, n_steps: int) -> dict[str, Path]:
    """One job file per scale: model dir, classifier dir, the prompts of every step (token ids), the settings."""
    import torch
    from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM

    from rlhf.resolve import resolve_dataset, resolve_model

    model_dir = resolve_model("fixture:tiny-gpt-neox")
    classifier_dir = resolve_model("fixture:tiny-distilbert-imdb")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # Prompts: the first 2-8 tokens of the fixture's reviews, as the quickstart's PPO cuts them.
    lines = (Path(resolve_dataset("fixture:imdb")) / "train.jsonl").read_text().splitlines()
    texts = [json.loads(line)["text"] for line in lines]
    g = torch.Generator().manual_seed(0)
    b = settings["batch_size"]
    picks = torch.randint(len(texts), (n_steps * b,), generator=g).tolist()
    lengths = torch.randint(
        settings["prompt_min_tokens"], settings["prompt_max_tokens"] + 1, (n_steps * b,), generator=g
    )
    ids = [tokenizer(texts[i])["input_ids"][: int(k)] for i, k in zip(picks, lengths)]
    prompts = [ids[s * b : (s + 1) * b] for s in range(n_steps)]
    jobs = {}
    for scale in scales:
        if scale == "quickstart":
            path = model_dir
        else:
            path = work / "random-105m"
            if not (path / "config.json").exists():
                torch.manual_seed(0)
                cfg = GPTNeoXConfig(**RANDOM_105M, bos_token_id=0, eos_token_id=0, tie_word_embeddings=False)
                GPTNeoXForCausalLM(cfg).save_pretrained(path)  # random init: values do not matter for time
                for name in ("tokenizer.json", "tokenizer_config.json"):
                    shutil.copy(Path(model_dir) / name, path / name)
        job = {"model": str(path), "classifier": str(classifier_dir), "prompts": prompts, "settings": settings}
        jobs[scale] = work / f"job-{scale}.json"
        jobs[scale].write_text(json.dumps(job))
    return jobs


# --- the rlhf side (a child process) ---------------------------------------------------------------------------


def rlhf_trainer(job: dict, work: Path, compile: bool = False):
    """A PPOTrainer set up as `rlhf ppo` sets it up (minus the run directory), on the job's model and prompts."""
    import torch

    from rlhf.config import load_recipe
    from rlhf.ppo.trainer import PPOTrainer
    from rlhf.rewards import load_reward
    from rlhf.rl.parallel import Parallel
    from rlhf.rl.telemetry import Log

    s = job["settings"]
    n = s["new_tokens"]
    overrides = [
        "model.quantization=none",
        f"model.dtype={s['dtype']}",
        f"ppo.batch_size={s['batch_size']}",
        f"ppo.mini_batch_size={s['mini_batch_size']}",
        f"ppo.rollout_batch_size={s['batch_size']}",
        f"ppo.ppo_epochs={s['ppo_epochs']}",
        f"ppo.learning_rate={s['learning_rate']}",
        f"ppo.init_kl_coef={s['init_kl_coef']}",
        "ppo.adaptive_kl=true",
        f"ppo.target_kl={s['target_kl']}",
        f"ppo.kl_horizon={s['kl_horizon']}",
        "ppo.entropy_coef=0",  # trl 0.11.4 has no entropy bonus
        f"ppo.generation.min_new_tokens={n}",
        f"ppo.generation.max_new_tokens={n}",
        "ppo.generation.stop_at_eos=false",
        f"ppo.lora.rank={s['lora_rank']}",
        f"ppo.lora.alpha={s['lora_alpha']}",
        "ppo.lora.dropout=0.0",
        f"ppo.lora.target_modules=[{','.join(s['target_modules'])}]",
        "ppo.gradient_checkpointing=false",
        "ppo.optimizer=adam",
        "ppo.eval_prompts=0",
        f"ppo.compile={str(compile).lower()}",
    ]
    recipe = load_recipe("quickstart", overrides)
    recipe = recipe.model_copy(update={"model": recipe.model.model_copy(update={"name": job["model"]})})
    torch.manual_seed(0)
    run = type("BenchRun", (), {"merged": Path(job["model"]), "root": work, "ppo_dir": work})()
    trainer = PPOTrainer(recipe, run, "quickstart-sentiment", Parallel())
    trainer.log = Log(work, "ppo", enabled=False)
    trainer._setup_model()
    trainer.reward = load_reward("quickstart-sentiment")

    # The job's prompts, the same on every side; no dataset is loaded on either (the trainer's _setup_data would
    # load and tokenize the corpus, which trl's side does not do).
    class FixedPrompts:
        def batch(self, step, size, rank=0, world_size=1):
            return job["prompts"][step % len(job["prompts"])]

    trainer.prompts = FixedPrompts()
    trainer._setup_optimizer()
    trainer.setup_controllers()
    return trainer


def run_rlhf(job_file: Path, compile: bool) -> dict:
    import torch

    job = json.loads(job_file.read_text())
    s = job["settings"]
    t_setup = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="rlhf-vs-trl-"))
    trainer = rlhf_trainer(job, work, compile)
    setup = time.perf_counter() - t_setup
    rows = []
    for step in range(s["warmup"] + s["steps"]):
        t0 = time.perf_counter()
        stats = trainer.ppo_step()
        total = time.perf_counter() - t0
        sec = trainer.timer.seconds
        rows.append(
            {
                "total": total,
                "generate": sec.get("generate", 0.0),
                "reward": sec.get("reward", 0.0),
                "forward": sec.get("forward", 0.0),
                "train": sec.get("train", 0.0),
                "tokens": stats["response_len"] * s["batch_size"],
                "kl": stats["kl"],
            }
        )
        print(f"   rlhf{' compile' if compile else ''} step {step}: {total:.2f} s", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    import peft
    import transformers

    return {
        "side": "rlhf-compile" if compile else "rlhf",
        "steps": rows[s["warmup"] :],
        "warmup": sum(r["total"] for r in rows[: s["warmup"]]),
        "setup": setup,
        "peak_rss": peak_rss(),
        "versions": {"transformers": transformers.__version__, "peft": peft.__version__, "torch": torch.__version__},
    }


# --- the parent ---------------------------------------------------------------------------------------------------


def child(cmd: list[str]) -> dict:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
    lines = proc.stdout.splitlines()
    print("\n".join(line for line in lines if not line.startswith("RESULT ")), flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd} failed with exit code {proc.returncode}")
    return json.loads(next(line for line in lines if line.startswith("RESULT "))[len("RESULT ") :])


def summarise(runs: list[dict]) -> dict:
    steps = [row for run in runs for row in run["steps"]]
    med = {k: statistics.median(r[k] for r in steps) for k in ("total", "generate", "reward", "forward", "train")}
    tokens = statistics.median(r["tokens"] for r in steps)
    return {
        **med,
        "all_totals": [round(r["total"], 3) for r in steps],
        "tokens_per_s": tokens / med["total"],
        "peak_rss": max(run["peak_rss"] for run in runs),
        "warmup": statistics.median(run["warmup"] for run in runs),
        "versions": runs[0]["versions"],
        "n": len(steps),
    }


def machine() -> str:
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    cpu = platform.processor() or platform.machine()
    try:
        name = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
        cpu = name
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()} CPU cores ({cpu}), {total / 2**30:.0f} GiB RAM, no GPU"


def section(result: dict) -> str:
    dtype = result["settings"]["dtype"]
    flag = "" if dtype == "float32" else f" --dtype {dtype}"
    out = [
        SECTION,
        "",
        f"`bash benchmarks/ppo_vs_trl.sh --rounds {result['rounds']} --steps {result['settings']['steps']}{flag}` — "
        f"{result['date']}, {result['machine']}; load average {result['load'][0]:.1f} before, "
        f"{result['load'][1]:.1f} after. rlhf at commit {result['commit']} (torch "
        f"{result['rlhf_versions']['torch']}, transformers {result['rlhf_versions']['transformers']}, peft "
        f"{result['rlhf_versions']['peft']}); trl {result['trl_versions']['trl']} with transformers "
        f"{result['trl_versions']['transformers']}, peft {result['trl_versions']['peft']}, torch "
        f"{result['trl_versions']['torch']}. Batch 16, mini-batch 4, 4 PPO epochs, LoRA r=16 on query_key_value, "
        f"responses of exactly 16 tokens, prompts of 2-8 tokens, {result['settings']['dtype']}, unquantized on every "
        f"side; each side in "
        f"its own process, {result['rounds']} rounds interleaved, 1 warm-up + {result['settings']['steps']} "
        f"measured steps a round: medians of {result['rounds'] * result['settings']['steps']} steps.",
        "",
        "| scale | side | s / step | x trl batched | response tok/s | generate | reward | forward passes | update | "
        "peak RSS | first step |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for scale, sides in result["scales"].items():
        base = sides["trl-batched"]["total"]
        for side in SIDES:
            r = sides.get(side)
            if r is None:
                continue
            out.append(
                f"| {scale} | {side} | {r['total']:.3f} | {base / r['total']:.2f}x | {r['tokens_per_s']:.0f} | "
                f"{r['generate']:.3f} | {r['reward']:.3f} | {r['forward']:.3f} | {r['train']:.3f} | "
                f"{r['peak_rss'] / 2**20:.0f} MiB | {r['warmup']:.1f} s |"
            )
    out += [
        "",
        "`x trl batched`: trl batched's seconds per step over the side's (above 1: faster). The split is each "
        "side's own timers: rlhf's `time_generate/reward/forward/train` metrics; trl's generate and pipeline calls "
        "and its `time/ppo/forward_pass` and `time/ppo/optimize_step` (trl's step also computes statistics, "
        "hence its total exceeds the four). `rlhf-compile`: rlhf with `ppo.compile: true`, whose first step compiles "
        "the scoring and update passes (`first step`: the warm-up step, not in the medians).",
        "",
    ]
    wrap = lambda line: line if line.startswith("|") else textwrap.fill(line, 120, break_on_hyphens=False)  # noqa: E731
    return "\n".join(wrap(line) for line in out)


def write_section(text: str) -> None:
    doc = DOC.read_text()
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    doc = pattern.sub(lambda _: text + "\n", doc) if pattern.search(doc) else doc.rstrip() + "\n\n" + text
    DOC.write_text(doc.rstrip() + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trl-python", help="python of the trl 0.11.4 venv (benchmarks/ppo_vs_trl.sh builds it)")
    parser.add_argument(
        "--scales", nargs="+", choices=["quickstart", "random-105m"], default=["quickstart", "random-105m"]
    )
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="of both sides' models")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=SETTINGS["steps"], help="measured steps per side and round")
    parser.add_argument("--workdir", type=Path, help="keep the job files and the random model here")
    parser.add_argument("--no-write", action="store_true", help="print the section, do not write docs/benchmarks.md")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--from-json", type=Path, help="render the section from a --json file of an earlier run")
    parser.add_argument("--rlhf-child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rlhf_child:
        print("RESULT " + json.dumps(run_rlhf(args.rlhf_child, args.compile)), flush=True)
        return
    if args.from_json:
        text = section(json.loads(args.from_json.read_text()))
        print(text)
        if not args.no_write:
            write_section(text)
        return
    if any(side.startswith("trl") for side in args.sides) and not args.trl_python:
        raise SystemExit("--trl-python: the python of a trl 0.11.4 venv is needed (bash benchmarks/ppo_vs_trl.sh)")
    settings = dict(SETTINGS, steps=args.steps, dtype=args.dtype)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="rlhf-vs-trl-"))
    work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]
    jobs = build_inputs(work, args.scales, settings, settings["warmup"] + settings["steps"])
    trl_side = str(ROOT / "benchmarks" / "trl_0114_side.py")
    commands = {
        "rlhf": lambda job: [sys.executable, __file__, "--rlhf-child", str(job)],
        "rlhf-compile": lambda job: [sys.executable, __file__, "--rlhf-child", str(job), "--compile"],
        "trl-batched": lambda job: [args.trl_python, trl_side, str(job), "batched"],
        "trl-one-at-a-time": lambda job: [args.trl_python, trl_side, str(job), "one-at-a-time"],
    }
    raw: dict[str, dict[str, list[dict]]] = {scale: {side: [] for side in args.sides} for scale in args.scales}
    for scale in args.scales:
        for round_ in range(args.rounds):
            # Alternate the order too, so that neither side always runs first in a round.
            order = args.sides if round_ % 2 == 0 else list(reversed(args.sides))
            for side in order:
                print(f"== {scale} round {round_ + 1}/{args.rounds}: {side}", flush=True)
                raw[scale][side].append(child(commands[side](jobs[scale])))
    scales = {scale: {side: summarise(runs) for side, runs in sides.items()} for scale, sides in raw.items()}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    dirty = subprocess.run(["git", "status", "--porcelain", "rlhf"], cwd=ROOT, capture_output=True, text=True).stdout
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "load": [load_before, os.getloadavg()[0]],
        "commit": commit.strip() + (" (+ uncommitted changes)" if dirty.strip() else ""),
        "settings": settings,
        "rounds": args.rounds,
        "scales": scales,
        "rlhf_versions": next(iter(scales.values()))["rlhf"]["versions"] if "rlhf" in args.sides else {},
        "trl_versions": next(iter(scales.values())).get("trl-batched", {}).get("versions", {}),
        "raw": raw,
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    for scale, sides in scales.items():
        for side, r in sides.items():
            print(f"{scale:12s} {side:18s} {r['total']:.3f} s/step  {r['tokens_per_s']:.0f} tok/s  "
                  f"gen {r['generate']:.3f} fwd {r['forward']:.3f} train {r['train']:.3f}  "
                  f"peak {r['peak_rss'] / 2**20:.0f} MiB")  # fmt: skip
    if set(args.sides) == set(SIDES):
        text = section(result)
        print(text)
        if not args.no_write:
            write_section(text)
            print(f"wrote the section {SECTION!r} of {DOC}")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
