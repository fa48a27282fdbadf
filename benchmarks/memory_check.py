"""Measure real SFT, PPO and GRPO steps beside the memory budget's prediction: the budget is checked, not hoped.

    python benchmarks/memory_check.py --model EleutherAI/pythia-160m --device cpu
    python benchmarks/memory_check.py --model llama-small --device cpu      # also qwen2-small, tiny (GPT-NeoX)
    python benchmarks/memory_check.py --model EleutherAI/gpt-neox-20b --device cuda --limit 24GiB --steps sft \
        --block-size 1024 --out gpu-20b-sft.json

A model of the given shape is written with random weights (no download; the values do not matter for memory, only
the shapes), loaded through rlhf's own code (`modeling.load_base` in 8-bit, `prepare_for_training`, `add_lora`) and
run through real steps:

sft   forward with labels (transformers' loss), backward, AdamW step: as `rlhf sft`'s Trainer does.
ppo   the phases of `rlhf ppo`, with its own `rlhf.rl.policy.Policy`: generation with a KV cache, the reward classifier
      (random DistilBERT of lvwerra/distilbert-imdb's shape), scoring by the policy and by the reference (adapter
      disabled), and the update (policy + value loss, backward, Adam step) in micro-batches.
grpo  the same phases without the value head (`rlhf grpo`): --rollout sequences, --group-size samples a prompt,
      the update on GRPO's clipped loss with beta x k3 to the reference.

Each step runs in its own process, after one warm-up iteration; then each phase's peak is read:
on CUDA torch.cuda.max_memory_allocated / max_memory_reserved (reset before each phase; --limit caps the process
at a smaller card's memory so the allocator behaves as it would there); on the CPU the peak resident set (VmHWM,
reset before each phase) minus the resident set before the model was loaded, which is what is measurable there.
The prediction is the budget's total for the matching moment less the CUDA context (which torch's counters do not
see).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from rlhf.units import GiB, MiB

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TINY = {  # the shape of rlhf's fixture:tiny-gpt-neox
    "architectures": ["GPTNeoXForCausalLM"],
    "model_type": "gpt_neox",
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "intermediate_size": 256,
    "vocab_size": 4096,
    "max_position_embeddings": 512,
    "rotary_pct": 0.25,
    "use_parallel_residual": True,
    "tie_word_embeddings": False,
    "hidden_act": "gelu",
    "bos_token_id": 0,
    "eos_token_id": 0,
    "torch_dtype": "float32",
}

# Families other than GPT-NeoX, scaled down to ~0.1 B parameters: grouped-query attention (8 heads, 2 KV heads) and a
# gated MLP; Qwen2 adds q/k/v biases and, like the small Qwen2.5 models, ties its input and output embeddings.
LLAMA_SMALL = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 512,
    "intermediate_size": 1536,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float32",
}
QWEN2_SMALL = {
    **LLAMA_SMALL,
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "vocab_size": 151936,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "use_sliding_window": False,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
}
SHAPES = {"tiny": TINY, "llama-small": LLAMA_SMALL, "qwen2-small": QWEN2_SMALL}


# --- a checkpoint with random weights ---------------------------------------------------------------------------


def config_for(model: str) -> dict:
    if model in SHAPES:
        return dict(SHAPES[model])
    from rlhf.budget.shapes import find_config

    return json.loads(find_config(model).read_text())


def write_random_checkpoint(config: dict, out: Path, dtype: str, shard_bytes: int = 2 * GiB) -> Path:
    """A HF model dir with random weights, written tensor by tensor: a 20B model never sits whole in RAM.

    Values come from one random pool (N(0, 0.02)) copied at random offsets: fast, and shapes are all that matters.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    if (out / "config.json").is_file() and (out / "model.safetensors.index.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    cfg = AutoConfig.for_model(**{k: v for k, v in config.items() if k != "architectures"})
    cfg.architectures = config.get("architectures")
    torch_dtype = getattr(torch, dtype)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(cfg)
    gen = torch.Generator().manual_seed(0)
    pool = (torch.randn(1 << 24, generator=gen) * 0.02).to(torch_dtype)
    weight_map, shard, size, index = {}, {}, 0, 0

    def flush() -> None:
        nonlocal shard, size, index
        if shard:
            index += 1
            name = f"model-{index:05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
            shard, size = {}, 0

    # Tied weights (a Qwen2's or Gemma's output embedding is its input embedding) are saved once, as real checkpoints
    # save them: two different random copies would make transformers untie them, and the model twice as large.
    unique = {name for name, _ in meta.named_parameters()}
    tied = {name for name, _ in meta.named_parameters(remove_duplicate=False)} - unique
    for name, param in meta.state_dict().items():
        if name in tied:
            continue
        n = param.numel()
        if name.endswith("bias"):
            tensor = torch.zeros(param.shape, dtype=torch_dtype)
        elif "norm" in name and param.dim() == 1:
            tensor = torch.ones(param.shape, dtype=torch_dtype)
        else:
            flat = torch.empty(n, dtype=torch_dtype)
            for start in range(0, n, pool.numel()):
                count = min(pool.numel(), n - start)
                offset = int(torch.randint(0, pool.numel() - count + 1, (1,), generator=gen))
                flat[start : start + count] = pool[offset : offset + count]
            tensor = flat.view(param.shape)
        if size + tensor.numel() * tensor.element_size() > shard_bytes:
            flush()
        shard[name] = tensor
        size += tensor.numel() * tensor.element_size()
    flush()
    total = sum(p.numel() * torch_dtype.itemsize for name, p in meta.state_dict().items() if name not in tied)
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
    )
    cfg.torch_dtype = dtype
    cfg.save_pretrained(out)
    return out


# --- measuring --------------------------------------------------------------------------------------------------


class Meter:
    """Peak memory of each phase: CUDA allocator counters; on the CPU, the resident set and the live tensor bytes.

    CPU "allocated": every live tensor when the phase starts, plus the largest rise of live tensor bytes during it
    (torch's memory profiler): the analogue of torch.cuda.max_memory_allocated.
    """

    def __init__(self, device: str, profile: bool):
        self.device = device
        self.profile = profile and device == "cpu"
        self.baseline = self.rss()
        self.readings: dict[str, list[dict[str, int]]] = {}

    @staticmethod
    def rss() -> int:
        import psutil

        return psutil.Process().memory_info().rss

    @staticmethod
    def hwm() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmHWM in /proc/self/status")

    @contextlib.contextmanager
    def phase(self, name: str, record: bool = True, profile: bool = False):
        """Measure the block as phase `name` (when `record`). `profile` (CPU): read live tensor bytes with torch's
        profiler instead of the resident set, which the profiler itself inflates."""
        import gc

        import torch

        gc.collect()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
        profile = profile and self.profile and record
        prof = None
        resident = live_tensor_bytes() if profile else 0
        if profile:
            from torch.profiler import ProfilerActivity, profile

            prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True)
            prof.__enter__()
        try:
            yield
        finally:
            if self.device == "cuda":
                torch.cuda.synchronize()
                reading = {"allocated": torch.cuda.max_memory_allocated(), "reserved": torch.cuda.max_memory_reserved()}
            elif prof is not None:
                prof.__exit__(None, None, None)
                reading = {"allocated": resident + tensor_peak(prof)}
            else:
                reading = {"rss_delta": self.hwm() - self.baseline}
            if record:
                self.readings.setdefault(name, []).append(reading)

    def now(self) -> dict[str, int]:
        import torch

        if self.device == "cuda":
            return {"allocated": torch.cuda.memory_allocated(), "reserved": torch.cuda.memory_reserved()}
        return {"rss_delta": self.rss() - self.baseline}

    def peaks(self) -> dict[str, dict[str, int]]:
        return {
            name: {k: max(r[k] for r in rs if k in r) for k in {k for r in rs for k in r}}
            for name, rs in self.readings.items()
        }


def live_tensor_bytes() -> int:
    """Bytes of every CPU tensor storage alive now (weights, quantization scales, optimizer states, ...)."""
    import gc

    import torch

    storages = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu" and not obj.is_meta:
            try:
                storage = obj.untyped_storage()
            except (RuntimeError, NotImplementedError):
                continue
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def tensor_peak(prof) -> int:
    """The largest rise of live CPU tensor bytes during a profiled region (creations less destructions)."""
    from torch.profiler._memory_profiler import Action, MemoryProfile

    sizes: dict = {}
    current = peak = 0
    for _, action, (key, _version), size in MemoryProfile(prof.profiler.kineto_results).timeline:
        if key.device.type != "cpu":
            continue
        if action == Action.PREEXISTING:
            sizes[key] = size
        elif action == Action.CREATE:
            sizes[key] = size
            current += size
        elif action == Action.DESTROY:
            current -= sizes.pop(key, 0)
        peak = max(peak, current)
    return peak


def recipe_for(args, model_dir: Path):
    from rlhf.config import (
        GenerationConfig,
        GrpoConfig,
        LoraConfig,
        ModelConfig,
        PpoConfig,
        Recipe,
        RewardConfig,
        SftConfig,
    )

    targets = args.lora_targets if args.lora_targets in ("auto", "all-linear") else args.lora_targets.split(",")
    return Recipe(
        model=ModelConfig(name=str(model_dir), quantization=args.quantization, dtype=args.dtype),
        lora=LoraConfig(rank=args.lora_rank, alpha=2 * args.lora_rank, dropout=0.05, target_modules=targets),
        sft=SftConfig(
            batch_size=args.sft_batch,
            block_size=args.block_size,
            optimizer="adamw",
            gradient_checkpointing=not args.no_checkpointing,
        ),
        ppo=PpoConfig(
            batch_size=args.rollout,
            mini_batch_size=args.mini_batch,
            gradient_accumulation_steps=args.accumulation,
            rollout_batch_size=args.rollout,
            prompt_min_tokens=args.prompt,
            prompt_max_tokens=args.prompt,
            generation=GenerationConfig(min_new_tokens=args.response, max_new_tokens=args.response),
            lora=LoraConfig(rank=args.lora_rank, alpha=2 * args.lora_rank, dropout=0.0, target_modules=targets),
            gradient_checkpointing=not args.no_checkpointing,
        ),
        grpo=GrpoConfig(
            batch_size=args.rollout // args.group_size,
            group_size=args.group_size,
            mini_batch_size=args.mini_batch,
            gradient_accumulation_steps=args.accumulation,
            rollout_batch_size=args.rollout,
            prompt_min_tokens=args.prompt,
            prompt_max_tokens=args.prompt,
            generation=GenerationConfig(min_new_tokens=args.response, max_new_tokens=args.response),
            lora=LoraConfig(rank=args.lora_rank, alpha=2 * args.lora_rank, dropout=0.0, target_modules=targets),
            gradient_checkpointing=not args.no_checkpointing,
        ),
        reward=RewardConfig(name="imdb-sentiment"),
    )


def reward_spec(args) -> dict:
    return {
        "model": "lvwerra/distilbert-imdb",
        "batch_size": args.reward_batch,
        "device": args.reward_device,
        "max_length": 512,
    }


def load_policy(args, model_dir: Path, lora, checkpointing: bool):
    from rlhf import modeling
    from rlhf.config import ModelConfig

    base = modeling.load_base(
        ModelConfig(name=str(model_dir), quantization=args.quantization, dtype=args.dtype), model_dir
    )
    modeling.prepare_for_training(base, checkpointing)
    if checkpointing and args.checkpointing != "modeling":
        base.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": args.checkpointing == "reentrant"}
        )
    return modeling.add_lora(base, lora)


def run_sft(args, model_dir: Path, meter: Meter) -> dict:
    import torch

    recipe = recipe_for(args, model_dir)
    model = load_policy(args, model_dir, recipe.lora, recipe.sft.gradient_checkpointing)
    loaded = meter.now()
    device = next(p.device for p in model.parameters())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    vocab = model.get_input_embeddings().num_embeddings
    for it in range(args.iters + 1):  # the first iteration warms up (optimizer states, kernels) and is not counted
        ids = torch.randint(0, vocab, (args.sft_batch, args.block_size), device=device)
        with meter.phase("step", record=it > 0, profile=it == args.iters):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        del loss
    return {"loaded": loaded, "phases": meter.peaks()}


def run_rl(args, model_dir: Path, meter: Meter) -> dict:
    """PPO's phases, or with args.step == "grpo" GRPO's: no value head, the group's advantage, k3 to the reference."""
    import torch

    from rlhf.grpo.core import grpo_loss
    from rlhf.ppo import core
    from rlhf.rl.core import policy_loss
    from rlhf.rl.policy import Policy, ValueHead

    grpo = args.step == "grpo"
    recipe = recipe_for(args, model_dir)
    cfg = recipe.grpo if grpo else recipe.ppo
    model = load_policy(args, model_dir, cfg.lora, cfg.gradient_checkpointing)
    device = next(p.device for p in model.parameters())
    policy = Policy(model, None if grpo else ValueHead(model.config.hidden_size).to(device))
    reward = build_reward(args, device)
    loaded = meter.now()
    opt = torch.optim.Adam(policy.trainable_parameters(), lr=1e-5)
    vocab = model.get_input_embeddings().num_embeddings
    P, R, B = args.prompt, args.response, args.rollout
    micro = args.mini_batch // args.accumulation
    seq_r = min(512, 2 * (P + R) + 2)  # as the budget assumes for the re-tokenized text
    for it in range(args.iters + 1):
        record, profile = it > 0, it == args.iters  # the last iteration is profiled (CPU)
        prompts = torch.randint(0, vocab, (B, P), device=device)
        pmask = torch.ones_like(prompts)
        model.eval()
        with meter.phase("generation", record, profile):
            response, rmask, _ = policy.generate(prompts, pmask, R)

        if reward is not None:
            with meter.phase("reward", record, profile), torch.no_grad():
                for start in range(0, B, args.reward_batch):
                    n = min(args.reward_batch, B - start)
                    ids = torch.randint(0, reward.config.vocab_size, (n, seq_r), device=reward.device)
                    reward(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()

        ids, mask = torch.cat([prompts, response], 1), torch.cat([pmask, rmask], 1)
        model.train()  # as rlhf.ppo.trainer scores: in the mode the update runs in, without grad
        with meter.phase("scoring", record, profile), torch.no_grad():
            old = policy.score(ids, mask, R, values=not grpo, entropy=True)
            with policy.reference():
                ref = policy.score(ids, mask, R, values=False)

        advantages = torch.randn(B, device=device) if grpo else torch.randn(B, R, device=device)
        returns = None if grpo else old.values + advantages
        rm = rmask.float()
        with meter.phase("update", record, profile):
            for start in range(0, B, args.mini_batch):
                opt.zero_grad(set_to_none=True)
                for m in range(start, min(start + args.mini_batch, B), micro):
                    idx = torch.arange(m, min(m + micro, B), device=device)
                    out = policy.score(ids[idx], mask[idx], R, values=not grpo)
                    if grpo:
                        loss, _ = grpo_loss(
                            out.logprobs, old.logprobs[idx], ref.logprobs[idx], advantages[idx], rm[idx], 0.2, 0.04
                        )
                    else:
                        pg, _ = policy_loss(out.logprobs, old.logprobs[idx], advantages[idx], rm[idx], 0.2)
                        vf, _ = core.value_loss(out.values, old.values[idx], returns[idx], rm[idx], 0.2)
                        loss = pg + 0.1 * vf
                    loss.backward()
                    del out, loss
                opt.step()
            opt.zero_grad(set_to_none=True)
    return {"loaded": loaded, "phases": meter.peaks()}


def build_reward(args, policy_device):
    """lvwerra/distilbert-imdb's shape with random weights, fp32 (its checkpoint dtype), on the spec's device."""
    if args.reward_device == "none":
        return None
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from rlhf.budget.shapes import shipped_config

    raw = json.loads(shipped_config("lvwerra/distilbert-imdb").read_text())
    cfg = AutoConfig.for_model(**{k: v for k, v in raw.items() if k not in ("architectures", "_name_or_path")})
    device = policy_device if args.reward_device in ("auto", "cuda") else torch.device("cpu")
    return AutoModelForSequenceClassification.from_config(cfg).to(device).eval().requires_grad_(False)


# --- prediction beside measurement ------------------------------------------------------------------------------

MOMENTS = {  # measured phase -> the budget's moments it spans
    "step": ("loss (fp32 logits)", "backward (one layer)"),
    "generation": ("generation (KV cache)",),
    "reward": ("reward",),
    "scoring": ("scoring (policy + reference)",),
    "update": ("update (loss)", "update (backward)"),
}


def predict(args, model_dir: Path, step: str) -> dict:
    """Per measured phase: the budget's allocated bytes (its total less the overhead) and its reserved bytes (less
    only the CUDA context), taking the largest of the moments the phase spans."""
    from rlhf import budget
    from rlhf.budget import moments as budget_moments

    if args.checkpointing != "modeling":
        budget_moments.checkpoint_reentrant = lambda: args.checkpointing == "reentrant"
    est = budget.estimate(recipe_for(args, model_dir), step, 1 << 50, reward_spec(args), device_kind=args.device)
    phases = {}
    for phase, moments in MOMENTS.items():
        present = [est.moments[m] for m in moments if m in est.moments]
        if present:
            phases[phase] = {
                "allocated": max(sum(m.values()) - m["overhead"] for m in present),
                "reserved": max(sum(m.values()) for m in present) - est.context_bytes,
            }
    return {"weights": est.components["weights"], "phases": phases, "components": est.components, "peak": est.peak}


def child(args) -> None:
    """One step in this process: load, warm up, measure; print one JSON line."""
    import torch

    if args.device == "cuda" and args.limit:
        from rlhf.budget.device import CUDA_CONTEXT, gpu_bytes

        # A card of --limit bytes: its CUDA context comes out of the same memory, outside torch's allocator.
        total = torch.cuda.mem_get_info()[1]
        torch.cuda.set_per_process_memory_fraction(min(1.0, (gpu_bytes(args.limit) - CUDA_CONTEXT) / total))
    model_dir = Path(args.model_dir)
    # Libraries are loaded before the baseline: the CPU measurement is about tensors, not about code.
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification  # noqa: F401

    import rlhf.grpo.core  # noqa: F401
    import rlhf.modeling  # noqa: F401
    import rlhf.rl.policy  # noqa: F401

    meter = Meter(args.device, profile=not args.no_profile)
    started = time.time()
    try:
        result = run_sft(args, model_dir, meter) if args.step == "sft" else run_rl(args, model_dir, meter)
    except torch.OutOfMemoryError as exc:  # under --limit: the prediction said so, or it was wrong; both are data
        result = {"loaded": {}, "phases": meter.peaks(), "oom": str(exc).splitlines()[0]}
    result["seconds"] = round(time.time() - started, 1)
    if args.device == "cuda":  # what the driver holds beyond torch's allocator: the CUDA context, cuBLAS, kernels
        free, total = torch.cuda.mem_get_info()
        result["context"] = total - free - torch.cuda.memory_reserved()
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model",
        default="EleutherAI/pythia-160m",
        help=f"{', '.join(SHAPES)}, a hub id with a shipped or cached config.json, or a dir with config.json",
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--steps", default="sft,ppo")
    p.add_argument("--quantization", choices=["8bit", "4bit", "none"], default="8bit")
    p.add_argument(
        "--dtype", choices=["float16", "bfloat16", "float32"], help="default: float16 on cuda, float32 on cpu"
    )
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-targets", default="auto", help="auto, all-linear, or names joined by commas")
    p.add_argument("--no-checkpointing", action="store_true")
    p.add_argument(
        "--checkpointing",
        choices=["modeling", "reentrant", "non-reentrant"],
        default="modeling",
        help="gradient checkpointing as rlhf.modeling sets it up, or forced either way (and so predicted)",
    )
    p.add_argument("--sft-batch", type=int, default=1)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--rollout", type=int, default=8, help="rollout batch (one chunk is generated, scored, trained)")
    p.add_argument("--group-size", type=int, default=4, help="grpo: samples a prompt (--rollout / this = prompts)")
    p.add_argument("--mini-batch", type=int, default=4)
    p.add_argument("--accumulation", type=int, default=1)
    p.add_argument("--prompt", type=int, default=8)
    p.add_argument("--response", type=int, default=16)
    p.add_argument("--reward-batch", type=int, default=16)
    p.add_argument("--reward-device", choices=["auto", "cuda", "cpu", "none"], default="auto")
    p.add_argument(
        "--iters",
        type=int,
        default=2,
        help="measured iterations after one warm-up (on the CPU the last one is profiled)",
    )
    p.add_argument("--no-profile", action="store_true", help="cpu: skip the tensor-level (profiler) measurement")
    p.add_argument("--limit", help="cuda: cap this process at a card's memory, e.g. 24GiB or rtx4090")
    p.add_argument("--workdir", default=os.environ.get("RLHF_MEMCHECK_DIR", "/tmp/rlhf-memcheck"))
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--prepare-only", action="store_true", help="write the random checkpoint and stop")
    p.add_argument("--step", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.dtype = args.dtype or ("float16" if args.device == "cuda" else "float32")
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    if args.step:
        return child(args)

    config = config_for(args.model)
    model_dir = Path(args.workdir) / f"{args.model.replace('/', '--')}-{args.dtype}"
    print(f"writing random {args.model} weights to {model_dir} ...", file=sys.stderr, flush=True)
    write_random_checkpoint(config, model_dir, args.dtype)
    if args.prepare_only:
        return
    rows = []
    for step in args.steps.split(","):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--step", step, "--model-dir", str(model_dir)]
        # glibc keeps freed memory unless large blocks are mmapped: then the resident set follows the live tensors.
        env = {
            "MALLOC_MMAP_THRESHOLD_": "65536",
            "MALLOC_TRIM_THRESHOLD_": "131072",
            "MALLOC_ARENA_MAX": "2",
            **os.environ,
            "PYTHONWARNINGS": "ignore",
        }
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
            raise SystemExit(f"{step} failed (exit {proc.returncode})")
        measured = json.loads(line.removeprefix("RESULT "))
        predicted = predict(args, model_dir, step)
        rows.append(compare(args, step, measured, predicted))
    report = {
        "model": args.model,
        "device": device_name(args.device),
        "date": time.strftime("%Y-%m-%d"),
        "settings": {k: v for k, v in vars(args).items() if k not in ("step", "model_dir", "out")},
        "rows": rows,
    }
    print(table(report))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


def compare(args, step: str, measured: dict, predicted: dict) -> dict:
    """Measured beside predicted: allocated (tensors) and reserved (CUDA allocator) or resident set (CPU)."""
    second = "reserved" if args.device == "cuda" else "rss_delta"
    phases = []
    for phase, reading in measured["phases"].items():
        row = {"phase": phase}
        for key, pred_key in (("allocated", "allocated"), (second, "reserved")):
            if key in reading:
                want, got = predicted["phases"][phase][pred_key], reading[key]
                row[key] = {"predicted": want, "measured": got, "error_pct": round(100 * (want - got) / got, 1)}
        phases.append(row)
    return {
        "step": step,
        "oom": measured.get("oom"),
        "context_measured": measured.get("context"),
        "weights_predicted": predicted["weights"],
        "loaded_measured": measured["loaded"],
        "phases": phases,
        "components": predicted["components"],
        "seconds": measured["seconds"],
    }


def device_name(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def table(report: dict) -> str:
    second = "reserved" if report["settings"]["device"] == "cuda" else "rss_delta"
    label = "reserved" if second == "reserved" else "resident set"

    def cell(entry: dict | None) -> str:
        if not entry:
            return "- | - |"
        error = entry["predicted"] - entry["measured"]
        return (
            f"{entry['predicted'] / MiB:,.1f} / {entry['measured'] / MiB:,.1f} MiB | "
            f"{error / MiB:+,.1f} MiB ({entry['error_pct']:+.1f}%) |"
        )

    lines = [
        f"{report['model']} on {report['device']}, {report['date']}",
        f"| step | phase | allocated: predicted / measured | error | {label}: predicted / measured | error |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for row in report["rows"]:
        for ph in row["phases"]:
            lines.append(f"| {row['step']} | {ph['phase']} | {cell(ph.get('allocated'))} {cell(ph.get(second))}")
        if row.get("oom"):
            lines.append(f"| {row['step']} | out of memory | {row['oom'][:80]} | | | |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
