"""Peak RAM and time of the streaming `rlhf merge` against peft's merge_and_unload, on a ~1 B-parameter GPT-NeoX.

    python benchmarks/merge_memory.py [--workdir /tmp/rlhf-merge-bench] [--keep]

Builds, from a config (no download), a random-weight GPT-NeoX-shaped checkpoint of about 1 B parameters at fp16 in
2 GB shards, and a random LoRA adapter (r=16, alpha=32, non-zero B) on query_key_value. Each merge then runs in its
own subprocess, so the peaks (ru_maxrss) do not mix, and the table goes into docs/benchmarks.md, section "## Merge".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

from rlhf.memory import peak_rss_bytes
from rlhf.units import GiB

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
SHARD = "2GB"
# hidden 2048, 16 layers, 50304-token vocab: 12 * 16 * 2048^2 + 2 * 50304 * 2048 = 1.01 B parameters
SHAPE = dict(
    hidden_size=2048,
    num_hidden_layers=16,
    num_attention_heads=16,
    intermediate_size=8192,
    vocab_size=50304,
    max_position_embeddings=2048,
)


# --- the children: each prints one RESULT line ------------------------------------------------------------------


def build(work: Path) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(**SHAPE)).to(torch.float16)  # random init: values do not matter
    model.save_pretrained(work / "base", max_shard_size=SHARD)
    lora = LoraConfig(r=16, lora_alpha=32, target_modules=["query_key_value"], init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(work / "adapter")
    shards = sorted((work / "base").glob("*.safetensors"))
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "shards": len(shards),
        "largest_shard": max(p.stat().st_size for p in shards),
        "adapter": (work / "adapter" / "adapter_model.safetensors").stat().st_size,
    }


def imports_only(work: Path) -> dict:
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import rlhf.merge  # noqa: F401

    return {"peak": peak_rss_bytes(), "seconds": None}


def settle() -> None:
    """Flush the disk writes of earlier steps, so each timing pays only for its own."""
    os.sync()


def durable(path: Path) -> None:
    """fsync every file, as rlhf merge does before its rename: both rows pay for a merge that is on disk."""
    for file in path.iterdir():
        with open(file, "rb") as f:
            os.fsync(f.fileno())


def streaming(work: Path) -> dict:
    import peft  # noqa: F401  (imported inside merge_checkpoint; the time excludes imports)

    from rlhf.merge import merge_checkpoint

    settle()
    start = time.perf_counter()
    result = merge_checkpoint(work / "base", work / "adapter", work / "stream", "float16", SHARD, probe=False)
    return {
        "peak": peak_rss_bytes(),
        "seconds": time.perf_counter() - start,
        "predicted": result.predicted_peak_bytes,
        "max_abs_diff_weights": result.max_abs_diff_weights,
    }


def peft_merge(work: Path) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    settle()
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(work / "base", dtype=torch.float16)
    model = PeftModel.from_pretrained(model, work / "adapter").merge_and_unload()
    model.save_pretrained(work / "peft", max_shard_size=SHARD)
    durable(work / "peft")
    return {"peak": peak_rss_bytes(), "seconds": time.perf_counter() - start}


def compare(work: Path) -> dict:
    """Largest difference between the two merged checkpoints, one tensor at a time."""
    from safetensors import safe_open

    def tensors(path: Path) -> dict[str, Path]:
        names = {}
        for shard in sorted(path.glob("*.safetensors")):
            with safe_open(shard, "pt") as f:
                names |= dict.fromkeys(f.keys(), shard)
        return names

    ours, theirs = tensors(work / "stream"), tensors(work / "peft")
    worst = 0.0
    for name, shard in ours.items():
        with safe_open(shard, "pt") as a, safe_open(theirs[name], "pt") as b:
            worst = max(worst, float((a.get_tensor(name).float() - b.get_tensor(name).float()).abs().max()))
    return {"max_abs_diff": worst, "same_keys": ours.keys() == theirs.keys()}


CHILDREN = {"build": build, "imports": imports_only, "stream": streaming, "peft": peft_merge, "compare": compare}


# --- the parent -------------------------------------------------------------------------------------------------


def child(name: str, work: Path) -> dict:
    print(f"== {name}", flush=True)
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run(
        [sys.executable, __file__, "--child", name, "--workdir", str(work)],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        check=True,
    )
    lines = proc.stdout.splitlines()
    print("\n".join(line for line in lines if not line.startswith("RESULT ")), flush=True)
    return json.loads(next(line for line in lines if line.startswith("RESULT "))[len("RESULT ") :])


def machine() -> str:
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return f"{os.cpu_count()} CPU cores / {total / GiB:.0f} GiB RAM, {platform.system()} {platform.machine()}"


def gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def table(ckpt: dict, floor: dict, stream: dict, peft: dict, diff: dict) -> str:
    import peft as peft_lib
    import torch
    import transformers

    limit = 2 * ckpt["largest_shard"] + ckpt["adapter"] + GiB
    ratio = stream["peak"] / peft["peak"]
    verdict = "met" if stream["peak"] <= limit and ratio <= 1 / 3 else "NOT met"
    # gpt-neox-20b by the same accounting as rlhf.merge.ram.predict_peak_ram: the floor, the r=16 adapter twice (fp32),
    # and 12 bytes an element of its largest LoRA target, query_key_value (3 * 6144 x 6144)
    neox20b = floor["peak"] + 2 * 44 * 16 * (6144 + 3 * 6144) * 4 + 12 * 3 * 6144 * 6144
    return f"""## Merge

`python benchmarks/merge_memory.py` — {date.today().isoformat()}, {machine()}; torch {torch.__version__},
transformers {transformers.__version__}, peft {peft_lib.__version__}.

Checkpoint: GPT-NeoX-shaped, {ckpt["params"] / 1e9:.2f} B parameters, random fp16 weights built from a config, in
{ckpt["shards"]} safetensors shards of at most {SHARD} (largest {gib(ckpt["largest_shard"])}); LoRA r=16, alpha=32 on
query_key_value, random non-zero B (adapter {ckpt["adapter"] / 2**20:.1f} MiB). Output: fp16, {SHARD} shards. Each
row is its own process; peak RSS is ru_maxrss; time excludes imports and includes getting the output onto the disk
(fsync), which rlhf merge does before its final rename.

| merge | peak RSS | above the imports | time |
|---|---:|---:|---:|
| imports only (torch, transformers, peft, rlhf.merge) | {gib(floor["peak"])} | – | – |
| `rlhf merge`, streaming (in-stream peft check, no logit probe) | {gib(stream["peak"])} | \
{gib(stream["peak"] - floor["peak"])} | {stream["seconds"]:.0f} s |
| peft `merge_and_unload` on the whole model + `save_pretrained` | {gib(peft["peak"])} | \
{gib(peft["peak"] - floor["peak"])} | {peft["seconds"]:.0f} s |

- Streaming peak {gib(stream["peak"])}, predicted before the merge {gib(stream["predicted"])}.
- Target: streaming <= 2 x largest shard + adapter + 1 GiB = {gib(limit)}, and <= 1/3 of peft's
  ({gib(peft["peak"] / 3)}): {verdict} (streaming / peft = {ratio:.2f}).
- Same result: the two merged checkpoints hold the same tensors{"" if diff["same_keys"] else " (NOT the same keys)"},
  largest difference {diff["max_abs_diff"]:.3g} (they may differ by one fp16 step: peft adds the delta in fp16, the
  streaming merge in fp32). The streaming merge's own check against peft's delta: max
  {stream["max_abs_diff_weights"]:.3g}, every element within one fp16 rounding step.
- gpt-neox-20b (predicted by the same accounting, not measured here): about {gib(neox20b)} for the streaming merge —
  its largest LoRA target, query_key_value, is 113 M elements — against the 41 GB fp16 model peft holds.
"""


def write_section(section: str) -> None:
    """Replace the "## Merge" section of docs/benchmarks.md (other sections belong to other benchmarks)."""
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n\nMeasured numbers, written by the scripts named.\n"
    pattern = re.compile(r"^## Merge\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text).rstrip() + "\n"
    else:
        text = text.rstrip() + "\n\n" + section
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/rlhf-merge-bench"))
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints in --workdir afterwards")
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(CHILDREN[args.child](args.workdir)), flush=True)
        return

    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    try:
        ckpt = child("build", args.workdir)
        floor = child("imports", args.workdir)
        stream = child("stream", args.workdir)
        peft = child("peft", args.workdir)
        diff = child("compare", args.workdir)
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    section = table(ckpt, floor, stream, peft, diff)
    print(section)
    write_section(section)
    print(f"wrote the Merge section of {DOC}")


if __name__ == "__main__":
    main()
