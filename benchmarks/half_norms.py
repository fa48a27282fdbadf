"""Three ways to run the norms of a half-precision model, measured on the CPU: finite, memory, speed.

    python benchmarks/half_norms.py --model fixture --dtype float16
    python benchmarks/half_norms.py --model /path/to/SmolLM2-135M-Instruct --dtype float16 --tokens 256

fp32-cast     norm weights in fp32, the norm's input cast to fp32 and its output back to the activation dtype
autocast      norm weights in fp32, every forward under torch.autocast (norms in fp32 as CUDA autocast runs them)
model-dtype   norm weights left in model.dtype (the kernels accumulate in fp32 either way)

Each candidate loads the model through rlhf's own code (`load_base`, checkpointing as `prepare_for_training` sets it,
`add_lora`), in 8-bit unless told otherwise, and runs on real text (the fixture corpus, with the model's tokenizer):
- finite: `--steps` SFT steps (forward with labels, backward, AdamW at 1e-4): losses and gradient norms finite; then
  a no-grad scoring forward: log-probs finite, and their largest difference from the same model in fp32;
- CUDA's rules: the same step under `rlhf.testing.cuda_rules` (does it run where CUDA would refuse?);
- memory: live tensor bytes (torch's memory profiler) of one training step and of one scoring forward;
- speed: the median seconds of `--iters` training steps and scoring forwards.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

CANDIDATES = ("fp32-cast", "autocast", "model-dtype")


def norms(model):
    from torch import nn

    return [m for m in model.modules() if isinstance(m, nn.LayerNorm) or "RMSNorm" in type(m).__name__]


def prepare(model, candidate: str, dtype):
    """The candidate's norm handling, then rlhf's checkpointing (prepare_for_training less its norm handling)."""
    import torch

    from rlhf.checkpointing import CHECKPOINT_KWARGS

    for module in norms(model):
        if candidate in ("fp32-cast", "autocast"):
            module.to(torch.float32)
        if candidate == "fp32-cast":
            module.register_forward_pre_hook(lambda m, args: (args[0].float(), *args[1:]))
            module.register_forward_hook(lambda m, args, out, dtype=dtype: out.to(dtype))
    model.enable_input_require_grads()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs=CHECKPOINT_KWARGS)
    model.config.use_cache = False


def load(args, candidate: str, dtype_name: str, quantization: str):
    import torch

    from rlhf import modeling
    from rlhf.config import LoraConfig, ModelConfig

    path = model_dir(args)
    base = modeling.load_base(ModelConfig(name=str(path), quantization=quantization, dtype=dtype_name), path)
    dtype = getattr(torch, dtype_name)
    if dtype == torch.float32:
        modeling.prepare_for_training(base, True)
    else:
        prepare(base, candidate, dtype)
    model = modeling.add_lora(base, LoraConfig(rank=8, alpha=16, dropout=0.0, target_modules="auto"))
    model.train()
    return model


def model_dir(args) -> Path:
    if args.model == "fixture":
        from rlhf.fixtures import ensure_fixtures

        return ensure_fixtures(progress=False).policy
    return Path(args.model)


def batch(args):
    """`--batch` rows of `--tokens` tokens of the fixture corpus, in the model's own tokenizer."""
    from rlhf.fixtures import ensure_fixtures, load_split
    from rlhf.modeling import load_tokenizer

    tokenizer = load_tokenizer(model_dir(args))
    text = " ".join(r["text"] for r in load_split(ensure_fixtures(progress=False).imdb, "train")[:200])
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    need = args.batch * args.tokens
    return ids[:need].view(args.batch, args.tokens)


@contextlib.contextmanager
def context(candidate: str, dtype):
    """autocast: CPU autocast with CUDA autocast's fp32 norms (CPU autocast leaves norms in half), so that memory and
    speed are those of the policy a GPU would run."""
    import torch

    from rlhf.testing.cuda_rules import cuda_autocast_norms

    if candidate != "autocast":
        yield
        return
    with torch.autocast("cpu", dtype=dtype), cuda_autocast_norms():
        yield


def train_step(model, ids, candidate, dtype, opt=None):
    with context(candidate, dtype):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    import torch

    norm = float(torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads])))
    if opt is not None:
        opt.step()
    model.zero_grad(set_to_none=True)
    return float(loss), norm


def score(model, ids, candidate, dtype):
    import torch

    from rlhf.rl.core import logprobs_from_logits

    with torch.no_grad(), context(candidate, dtype):
        logits = model(input_ids=ids, logits_to_keep=ids.shape[1]).logits
        return logprobs_from_logits(logits[:, :-1], ids[:, 1:])


def peak_bytes(fn) -> int:
    """Live tensor bytes at the start plus the largest rise during `fn` (torch's memory profiler)."""
    from memory_check import live_tensor_bytes, tensor_peak
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    start = live_tensor_bytes()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as p:
        fn()
    return start + tensor_peak(p)


def median_seconds(fn, iters: int) -> float:
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(args, candidate: str, reference) -> dict:
    import torch

    from rlhf.testing.cuda_rules import CudaRuleError, cuda_rules

    dtype = getattr(torch, args.dtype)
    ids = batch(args)
    model = load(args, candidate, args.dtype, args.quantization)
    row: dict = {"candidate": candidate}
    try:
        with cuda_rules():
            train_step(model, ids, candidate, dtype)
            score(model, ids, candidate, dtype)
        row["cuda_rules"] = "passes"
    except CudaRuleError as exc:
        row["cuda_rules"] = str(exc).split(";")[0]
    except RuntimeError as exc:  # refused by the CPU itself
        row["cuda_rules"] = f"fails on the CPU: {str(exc).splitlines()[0]}"
        row["error"] = row["cuda_rules"]
        return row
    logprobs = score(model, ids, candidate, dtype)
    row["logprob_max_diff_vs_fp32"] = float((logprobs.float() - reference).abs().max())
    row["logprob_mean_diff_vs_fp32"] = float((logprobs.float() - reference).abs().mean())
    row["logprobs_finite"] = bool(torch.isfinite(logprobs).all())
    row["memory_score"] = peak_bytes(lambda: score(model, ids, candidate, dtype))
    row["memory_train"] = peak_bytes(lambda: train_step(model, ids, candidate, dtype))
    row["seconds_score"] = median_seconds(lambda: score(model, ids, candidate, dtype), args.iters)
    row["seconds_train"] = median_seconds(lambda: train_step(model, ids, candidate, dtype), args.iters)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    steps = [train_step(model, ids, candidate, dtype, opt) for _ in range(args.steps)]
    row["losses"] = [round(loss, 4) for loss, _ in steps]
    row["finite"] = row["logprobs_finite"] and all(math.isfinite(x) for step in steps for x in step)
    row["norm_weight_dtype"] = str(norms(model)[0].weight.dtype).removeprefix("torch.")
    return row


def main() -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="fixture", help="'fixture' (the tiny GPT-NeoX) or a model directory")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    p.add_argument("--quantization", default="8bit", choices=["8bit", "none"])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="SFT steps whose losses must stay finite")
    p.add_argument("--iters", type=int, default=3, help="timed repetitions (the median is reported)")
    p.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=CANDIDATES)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    torch.manual_seed(0)
    reference_model = load(args, "model-dtype", "float32", args.quantization)
    reference = score(reference_model, batch(args), "model-dtype", torch.float32).float()
    del reference_model
    rows = [measure(args, c, reference) for c in args.candidates]
    report = {
        "model": args.model,
        "dtype": args.dtype,
        "quantization": args.quantization,
        "batch": args.batch,
        "tokens": args.tokens,
        "torch": torch.__version__,
        "rows": rows,
    }
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
