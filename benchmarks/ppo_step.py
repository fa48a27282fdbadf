"""Where the time and memory of one PPO step go: generate / reward / forward (policy, value, reference) / train.

    python benchmarks/ppo_step.py [--device cpu|cuda] [--config FILE_OR_JSON] [--only NAME ...] [--no-write]

The step is the trainer's own, `PPOTrainer.ppo_step()`: `rlhf.rl.rollout` (generate with `Policy.generate`, reward,
the no-grad forward passes with `Policy.score`) and `rlhf.ppo.update.optimise()` (GAE, `rlhf.ppo.core` losses, backward,
optimizer), on a model set up by `PPOTrainer._setup_model()` (8-bit `load_base`, `prepare_for_training`, `add_lora`,
value head). The driver only wraps `policy.score`, `policy.reference`, the value head and `optimizer.step` with
`time.perf_counter()` (and `torch.cuda.synchronize()` on a GPU), so the trainer's phases split further:

  generate | reward (decode + classifier) | forward: policy, value head, reference | train: forward with grad,
  backward + losses, optimizer step | the rest (advantages, padding, bookkeeping)

Models:
  quickstart   `fixture:tiny-gpt-neox` in 8-bit, prompts from `fixture:imdb`, reward `quickstart-sentiment`
               (the tiny DistilBERT classifier, its own tokenizer): the `rlhf quickstart` path exactly.
  random       a GPT-NeoX-shaped model with random weights built from a `GPTNeoXConfig` (hidden 768, 8 layers,
               12 heads, vocab 50432: 134 M parameters, 57 M of them in the int8 layers), saved with
               `save_pretrained` and loaded in 8-bit through `rlhf.modeling.load_base`; its tokenizer is a word-level
               one whose tokens are the ids ("t123"), random 8-token prompts, and a callable reward (spec YAML,
               `rlhf.rewards.CallableReward`) computed from the token ids.
Each model runs twice: with the reference from the same weights (`disable_adapter()`, what `rlhf ppo` does) and with
a separate frozen reference copy (a second `load_base` of the same checkpoint, no adapter), which shows the memory
the disabled adapter saves. Each of these runs in its own subprocess (OMP_WAIT_POLICY=PASSIVE: the machine may be
shared, and busy-waiting OpenMP threads make torch several times slower there), so the peaks do not mix. A run is
one warm-up step and then `steps` measured ones (mean reported).

Memory: on CPU, resident memory after setup and the warm-up step (weights, reward model, optimizer state) and the
peak during the measured steps (VmHWM, reset through /proc/self/clear_refs after the warm-up); on CUDA also
torch.cuda.max_memory_reserved / max_memory_allocated over the measured steps.

`--config` (a JSON file, a YAML file or inline JSON) overrides the settings below, e.g. for a GPU session:
  --config '{"random": {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 16,
             "intermediate_size": 8192}, "batch_size": 64, "mini_batch_size": 16, "new_tokens": 32}'
The table goes into docs/benchmarks.md, section "## PPO step" (other sections are left alone).
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
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

from rlhf.units import GiB, MiB

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"

DEFAULTS = {
    "batch_size": 16,  # prompts per PPO step
    "prompt_tokens": 8,
    "new_tokens": 16,  # every response runs to exactly this length (min = max)
    "mini_batch_size": 8,
    "rollout_batch_size": 16,  # generated and scored at once
    "ppo_epochs": 1,
    "steps": 3,  # measured steps of the random model after one warm-up step
    "quickstart_steps": 5,  # of the quickstart model (half a second each)
    "dtype": None,  # None: float32 on CPU (the quickstart recipe's choice), float16 on CUDA
    # Pinned rather than read from the recipe: off, as recipes/quickstart.yaml has it for PPO (nothing to save at
    # these lengths); gpt-neox-20b.yaml turns it on, which recomputes one forward pass per mini-batch in backward.
    "gradient_checkpointing": False,
    "random": {  # GPTNeoXConfig of the random model
        "hidden_size": 768,
        "num_hidden_layers": 8,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
        "vocab_size": 50432,
        "max_position_embeddings": 2048,
    },
}
VARIANTS = {  # name -> (model, reference)
    "quickstart-shared": ("quickstart", "shared"),
    "quickstart-copy": ("quickstart", "copy"),
    "random-shared": ("random", "shared"),
    "random-copy": ("random", "copy"),
}


def merged_config(text: str | None) -> dict:
    cfg = json.loads(json.dumps(DEFAULTS))
    if not text:
        return cfg
    path = Path(text)
    if path.is_file():
        if path.suffix in (".yaml", ".yml"):
            import yaml

            extra = yaml.safe_load(path.read_text()) or {}
        else:
            extra = json.loads(path.read_text())
    else:
        extra = json.loads(text)
    unknown = sorted(set(extra) - set(cfg))
    if unknown:
        raise SystemExit(f"--config: unknown keys {unknown}; valid: {sorted(cfg)}")
    for key, value in extra.items():
        if key == "random":
            cfg["random"].update(value)
        else:
            cfg[key] = value
    return cfg


# --- memory -----------------------------------------------------------------------------------------------------


def proc_status(key: str) -> int:
    """VmRSS / VmHWM of this process in bytes (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def tensor_bytes(module) -> int:
    """Bytes of a module's parameters and buffers, each storage once (int8 weights count one byte an element)."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def trim_heap() -> None:
    """Hand freed heap pages back to the OS (glibc), so that resident memory shows what is live, not what loading
    the checkpoint once needed."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (and ru_maxrss) to the current RSS
        return True
    except OSError:
        return False


# --- the random model: a config, random weights, an id tokenizer, a reward on ids --------------------------------


def id_reward(texts: list[str]) -> list[float]:
    """Callable reward on token ids: the share of even ids in prompt+response, minus one half (mean 0 at random)."""
    out = []
    for text in texts:
        ids = [int(i) for i in re.findall(r"t(\d+)", text)]
        out.append(sum(1 for i in ids if i % 2 == 0) / max(len(ids), 1) - 0.5)
    return out


def build_random(work: Path, shape: dict) -> dict:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    config = GPTNeoXConfig(**shape, bos_token_id=0, eos_token_id=0, tie_word_embeddings=False)
    model = GPTNeoXForCausalLM(config)  # random init, float32: values do not matter for time and memory
    out = work / "random-model"
    model.save_pretrained(out)
    # A word-level tokenizer whose tokens are the ids: prompts are random ids, the reward reads the ids back.
    vocab = {f"t{i}": i for i in range(shape["vocab_size"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="t0", unk_token="t0", bos_token="t0").save_pretrained(out)
    head = model.get_output_embeddings()  # bitsandbytes leaves the output head unquantized
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head)
    (work / "id_reward.yaml").write_text("name: id-parity\ntype: callable\ncallable: ppo_step:id_reward\n")
    return {"path": str(out), "params": sum(p.numel() for p in model.parameters()), "int8_params": linear}


# --- one variant, in its own process ----------------------------------------------------------------------------


class Probe:
    """Wraps the policy's forward passes and the optimizer step with timers; the trainer's code is not changed."""

    def __init__(self, trainer, ref_policy, cuda: bool):
        import torch

        self.torch, self.cuda = torch, cuda
        self.seconds: dict[str, float] = defaultdict(float)
        self.in_reference = False
        self.max_reference_diff = 0.0
        policy = trainer.policy
        own_score, own_reference = policy.score, policy.reference
        value_forward = policy.value_head.forward

        def now() -> float:
            if cuda:
                torch.cuda.synchronize()
            return time.perf_counter()

        self.now = now
        self._value_seconds = 0.0

        def timed_value(hidden):
            t = now()
            out = value_forward(hidden)
            self._value_seconds += now() - t
            return out

        @contextmanager
        def reference():
            if ref_policy is None:
                with own_reference():  # the trainer's way: the same weights, adapter disabled
                    self.in_reference = True
                    try:
                        yield
                    finally:
                        self.in_reference = False
            else:
                ref_policy.model.train(policy.model.training)  # int8 layers compute per mode, as the policy's
                self.in_reference = True
                try:
                    yield
                finally:
                    self.in_reference = False

        def score(*args, **kwargs):
            self._value_seconds = 0.0
            t = now()
            if self.in_reference:
                out = (ref_policy.score if ref_policy is not None else own_score)(*args, **kwargs)
                self.seconds["fwd_reference"] += now() - t
                if ref_policy is not None:
                    # The same reference forward the trainer's way, interleaved in this process (so the shared
                    # machine's load hits both alike), and kept out of the step's time: speed and equality.
                    cpu, t = time.process_time(), now()
                    with own_reference():
                        same = own_score(*args, **kwargs)
                    self.seconds["shadow"] += now() - t
                    self.seconds["shadow_cpu"] += time.process_time() - cpu
                    diff = float((same.logprobs - out.logprobs).abs().max())
                    self.max_reference_diff = max(self.max_reference_diff, diff)
            else:
                grad = torch.is_grad_enabled()
                out = own_score(*args, **kwargs)
                spent = now() - t
                self.seconds["train_forward" if grad else "fwd_policy"] += spent - self._value_seconds
                self.seconds["train_value" if grad else "fwd_value"] += self._value_seconds
            return out

        policy.value_head.forward = timed_value
        policy.score = policy.forward = score  # rollout scoring calls score; the update calls the module
        policy.reference = reference
        opt_step = trainer.optimizer.step

        def step(*args, **kwargs):
            t = now()
            out = opt_step(*args, **kwargs)
            self.seconds["optimizer"] += now() - t
            return out

        trainer.optimizer.step = step


def run_variant(name: str, work: Path, cfg: dict, device: str) -> dict:
    import torch

    from rlhf import modeling
    from rlhf.config import load_recipe
    from rlhf.ppo.trainer import PPOTrainer
    from rlhf.resolve import resolve_model
    from rlhf.rewards import load_reward
    from rlhf.rl.parallel import Parallel
    from rlhf.rl.policy import Policy
    from rlhf.rl.telemetry import Log

    rss_imports = proc_status("VmRSS")
    model_kind, reference = VARIANTS[name]
    cuda = device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    dtype = cfg["dtype"] or ("float16" if cuda else "float32")
    p = cfg["prompt_tokens"]
    overrides = [
        f"model.dtype={dtype}",
        f"ppo.batch_size={cfg['batch_size']}",
        f"ppo.mini_batch_size={cfg['mini_batch_size']}",
        f"ppo.rollout_batch_size={cfg['rollout_batch_size']}",
        f"ppo.ppo_epochs={cfg['ppo_epochs']}",
        f"ppo.prompt_min_tokens={p}",
        f"ppo.prompt_max_tokens={p}",
        f"ppo.generation.min_new_tokens={cfg['new_tokens']}",
        f"ppo.generation.max_new_tokens={cfg['new_tokens']}",
        "ppo.eval_prompts=0",
        f"ppo.gradient_checkpointing={str(bool(cfg['gradient_checkpointing'])).lower()}",
        # the PPO settings of recipes/quickstart.yaml, pinned so that an edit there does not change the benchmark
        "model.quantization=8bit",
        "ppo.lora.rank=16",
        "ppo.lora.alpha=32",
        "ppo.lora.dropout=0.0",
        "ppo.lora.target_modules=[query_key_value]",
        "ppo.optimizer=adam",
        "ppo.learning_rate=2.0e-3",
        "ppo.init_kl_coef=0.05",
        "ppo.generation.top_k=0",
        "ppo.generation.top_p=1.0",
        "ppo.generation.temperature=1.0",
        "ppo.generation.stop_at_eos=false",
    ]
    if model_kind == "quickstart":
        path = resolve_model("fixture:tiny-gpt-neox")
        reward = "quickstart-sentiment"
    else:
        built = json.loads((work / "random.json").read_text())
        path = Path(built["path"])
        reward = str(work / "id_reward.yaml")
        sys.path.insert(0, str(Path(__file__).resolve().parent))  # `ppo_step:id_reward` for the callable reward
    recipe = load_recipe("quickstart", overrides)
    recipe = recipe.model_copy(update={"model": recipe.model.model_copy(update={"name": str(path)})})

    torch.manual_seed(0)
    t_setup = time.perf_counter()
    # The trainer's own setup, minus the run directory: _setup_model reads run.merged only; nothing is logged.
    run = type("BenchRun", (), {"merged": path, "root": path, "ppo_dir": work})()
    trainer = PPOTrainer(recipe, run, reward, Parallel())
    trainer.log = Log(work, "ppo", enabled=False)
    trainer._setup_model()
    trainer.reward = load_reward(reward)
    if model_kind == "quickstart":
        trainer._setup_data()
    else:  # random token prompts for the random-weight model, one fixed batch per step
        vocab = trainer.model.config.vocab_size

        class RandomPrompts:
            def batch(self, step, size, rank=0, world_size=1):
                g = torch.Generator().manual_seed(1000 + step)
                return torch.randint(1, vocab, (size, p), generator=g).tolist()

        trainer.prompts = RandomPrompts()
    trainer._setup_optimizer()
    trainer.setup_controllers()
    c = trainer.cfg
    ref_policy = None
    if reference == "copy":
        ref = modeling.load_base(recipe.model, path)
        modeling.prepare_for_training(ref, False)  # prepared like the policy; frozen, no checkpointing
        ref_policy = Policy(ref, None, c.generation.temperature)
    probe = Probe(trainer, ref_policy, cuda)
    setup_seconds = time.perf_counter() - t_setup
    trainable, total = modeling.count_parameters(trainer.model)

    def one_step() -> dict:
        probe.seconds.clear()
        cpu, t = time.process_time(), probe.now()
        stats = trainer.ppo_step()  # the trainer's own step: rollout, scoring, update, KL controller
        elapsed = probe.now() - t - probe.seconds["shadow"]
        cpu = time.process_time() - cpu - probe.seconds["shadow_cpu"]
        s, q = trainer.timer.seconds, probe.seconds
        tokens = stats["response_len"] * c.batch_size
        row = {
            "total": elapsed,
            "generate": s["generate"],
            "reward": s["reward"],
            "forward": s["forward"] - q["shadow"],
            "cpu": cpu,
            "shadow_reference": q["shadow"],
            "fwd_policy": q["fwd_policy"],
            "fwd_value": q["fwd_value"],
            "fwd_reference": q["fwd_reference"],
            "train": s["train"],
            "train_forward": q["train_forward"] + q["train_value"],
            "optimizer": q["optimizer"],
            "tokens": tokens,
            "tokens_per_s": tokens / elapsed,
            "kl": stats["kl"],
            "reward_mean": stats["reward_mean"],
        }
        row["backward"] = row["train"] - row["train_forward"] - row["optimizer"]
        row["other"] = row["total"] - row["generate"] - row["reward"] - row["forward"] - row["train"]
        return row

    warm = one_step()  # first calls allocate, build kernels, create Adam's moments
    trim_heap()
    rss_ready = proc_status("VmRSS")
    reset = reset_peak_rss()
    if cuda:
        ready_alloc = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    rows = [one_step() for _ in range(cfg["steps"] if model_kind == "random" else cfg["quickstart_steps"])]
    # Sanity: the adapter learned (lora_B starts at zero; gradients reached it) and the first KL was ~0.
    lora = [p_.detach() for n_, p_ in trainer.model.named_parameters() if "lora_" in n_]
    moved = max(float(p_.detach().abs().max()) for n_, p_ in trainer.model.named_parameters() if "lora_B" in n_)
    checksum = sum(float(p_.double().sum()) for p_ in lora)
    result = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
    result.update(
        variant=name,
        model=model_kind,
        reference=reference,
        device=device,
        dtype=dtype,
        warmup_total=warm["total"],
        setup_seconds=setup_seconds,
        steps=len(rows),
        params=total,
        trainable=trainable,
        checkpointing=c.gradient_checkpointing,
        rss_imports=rss_imports,
        rss_ready=rss_ready,
        rss_peak=proc_status("VmHWM") if reset else None,
        process_peak=proc_status("VmHWM") if not reset else None,
        all_totals=[r["total"] for r in rows],
        lora_b_max=moved,
        lora_sum=checksum,
        max_reference_diff=probe.max_reference_diff if ref_policy is not None else None,
        warmup_kl=warm["kl"],
        policy_tensor_bytes=tensor_bytes(trainer.model) + tensor_bytes(trainer.policy.value_head),
        reference_tensor_bytes=tensor_bytes(ref_policy.model) if ref_policy is not None else 0,
    )
    if cuda:
        result.update(
            cuda_ready_allocated=ready_alloc,
            cuda_peak_reserved=torch.cuda.max_memory_reserved(),
            cuda_peak_allocated=torch.cuda.max_memory_allocated(),
        )
    return result


# --- the parent -------------------------------------------------------------------------------------------------


def child(args: list[str], device: str) -> dict:
    env = dict(
        os.environ,
        PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        OMP_WAIT_POLICY="PASSIVE",
        TOKENIZERS_PARALLELISM="false",
    )
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run([sys.executable, __file__, *args], env=env, stdout=subprocess.PIPE, text=True)
    lines = proc.stdout.splitlines()
    print("\n".join(line for line in lines if not line.startswith("RESULT ")), flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"child {args} failed with exit code {proc.returncode}")
    return json.loads(next(line for line in lines if line.startswith("RESULT "))[len("RESULT ") :])


def machine(device: str) -> str:
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    text = f"{os.cpu_count()} CPU cores, {total / GiB:.0f} GiB RAM, {platform.system()} {platform.machine()}"
    if device == "cuda":
        import torch

        text += f", {torch.cuda.get_device_name(0)}"
    else:
        text += ", no GPU"
    return text


def ms(x: float) -> str:
    return f"{x * 1000:,.0f}"


def pct(x: float, total: float) -> str:
    return f"{100 * x / total:.0f}%"


def gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if abs(n) >= 0.1 * GiB else f"{n / MiB:.1f} MiB"


def peak(r: dict) -> int:
    """The step's peak RSS, or the whole process's where VmHWM could not be reset."""
    return r["rss_peak"] if r["rss_peak"] is not None else r["process_peak"]


def labels(built: dict | None) -> dict[str, str]:
    """Row names; the random model is named by its real size."""
    return {"quickstart": "quickstart", "random": f"random-{built['params'] / 1e6:.0f}m" if built else "random"}


REFS = {"shared": "disable_adapter", "copy": "copy"}


def section(run: dict) -> str:
    import peft
    import torch
    import transformers

    results, cfg, device, built = run["results"], run["config"], run["device"], run["built"]
    L = labels(built)
    first = next(iter(results.values()))
    shape = cfg["random"]
    quick = next((r for r in results.values() if r["model"] == "quickstart"), None)
    cuda = device == "cuda"
    steps = sorted({f"{r['steps']} ({L[r['model']]})" for r in results.values()})
    lines = [
        "## PPO step",
        "",
        f"`python benchmarks/ppo_step.py{' --device cuda' if cuda else ''}` — {run['date']}, {run['machine']}; "
        f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}; the whole "
        f"benchmark took {run['wall'] / 60:.1f} min. The machine was shared: load average {run['load'][0]:.1f} "
        f"before and {run['load'][1]:.1f} after, on {os.cpu_count()} cores, so the times below are slower and "
        f"noisier (some 10-30% between runs) than on an idle machine; the shares and the memory are steadier.",
        "",
        f"One PPO step = `PPOTrainer.rollout()` + `PPOTrainer.optimise()`, unchanged: {cfg['batch_size']} prompts of "
        f"{cfg['prompt_tokens']} tokens, {cfg['new_tokens']} new tokens each (sampled from the full distribution), "
        f"rollout batch {cfg['rollout_batch_size']}, mini-batch {cfg['mini_batch_size']}, {cfg['ppo_epochs']} PPO "
        f"epoch, Adam; policy LoRA r=16 on query_key_value + fp32 value head on an 8-bit base (bitsandbytes "
        f"LLM.int8), computing in {first['dtype']}; gradient checkpointing "
        f"{'on' if first['checkpointing'] else 'off'} (as recipes/quickstart.yaml has it for PPO). Each row is its "
        f"own process (OMP_WAIT_POLICY=PASSIVE); times are the mean of {', '.join(steps)} steps after a warm-up "
        f"step, in ms, with the share of the step in brackets.",
        "",
    ]
    if quick:
        lines.append(
            f"- quickstart: `fixture:tiny-gpt-neox` (4 layers, hidden 64, vocab 2048; {quick['params'] / 1e6:.2f} M "
            f"parameters), prompts from `fixture:imdb`, reward `quickstart-sentiment` (the tiny DistilBERT on the "
            f"decoded text, with its own tokenizer)."
        )
    if built:
        lines.append(
            f"- {L['random']}: GPT-NeoX-shaped, random weights from a `GPTNeoXConfig` "
            f"(hidden {shape['hidden_size']}, {shape['num_hidden_layers']} layers, "
            f"{shape['num_attention_heads']} heads, vocab {shape['vocab_size']}): "
            f"{built['params'] / 1e6:.0f} M parameters, {built['int8_params'] / 1e6:.0f} M of them in the int8 "
            f"layers (the embedding and the output head stay {first['dtype']}); saved with `save_pretrained`, loaded "
            f"through `rlhf.modeling.load_base`; random prompts, a callable reward on the token ids."
        )
    lines += [
        "- reference `disable_adapter`: the reference log-probs from the same weights with the adapter switched off "
        "(what `rlhf ppo` does); `copy`: a second frozen `load_base` of the same checkpoint as the reference.",
        "- fwd policy includes the log-probs and entropy over the vocabulary; fwd value head is the head alone (its "
        "input is the policy pass's last hidden state); train fwd is the forward with grad of the mini-batches "
        "(policy and value together); rest is GAE, whitening, padding and bookkeeping. CPU time is the process's "
        "(all threads) over the step: less sensitive than wall time to other jobs on the machine.",
        "",
        "| model | reference | step | CPU time | generate | reward | fwd policy | fwd value head | fwd reference | "
        "train fwd | backward + loss | optimizer | rest | response tokens/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results.values():
        t = r["total"]
        cells = [f"**{ms(t)}**", ms(r["cpu"])]
        cells += [f"{ms(r[k])} ({pct(r[k], t)})" for k in ("generate", "reward", "fwd_policy")]
        cells += [ms(r["fwd_value"])]
        cells += [f"{ms(r[k])} ({pct(r[k], t)})" for k in ("fwd_reference", "train_forward", "backward")]
        cells += [ms(r["optimizer"]), ms(r["other"]), f"{r['tokens_per_s']:.0f}"]
        lines.append(f"| {L[r['model']]} | {REFS[r['reference']]} | " + " | ".join(cells) + " |")
    gpu_head = "GPU allocated after setup | GPU peak allocated | GPU peak reserved | " if cuda else ""
    lines += [
        "",
        "| model | reference | weights held (tensors) | RSS after imports | resident after setup + warm-up | "
        "peak in the step | " + gpu_head + "setup |",
        "|---|---|---:|---:|---:|---:|" + ("---:|" * 3 if cuda else "") + "---:|",
    ]
    for r in results.values():
        held = gib(r["policy_tensor_bytes"] + r["reference_tensor_bytes"])
        if r["reference_tensor_bytes"]:
            held += f" ({gib(r['policy_tensor_bytes'])} + copy {gib(r['reference_tensor_bytes'])})"
        row = (
            f"| {L[r['model']]} | {REFS[r['reference']]} | {held} | {gib(r['rss_imports'])} | "
            f"{gib(r['rss_ready'])} | {gib(peak(r))} | "
        )
        if cuda:
            row += (
                f"{gib(r['cuda_ready_allocated'])} | {gib(r['cuda_peak_allocated'])} | "
                f"{gib(r['cuda_peak_reserved'])} | "
            )
        lines.append(row + f"{r['setup_seconds']:.1f} s |")
    lines += [
        "",
        "Resident memory is measured after the warm-up step and a `malloc_trim`, so it counts what is live (weights, "
        "reward model, Adam's moments, the allocator's caches) rather than what loading the checkpoint once needed; "
        "the peak is VmHWM over the measured steps, reset after the warm-up through /proc/self/clear_refs."
        + (
            " On CUDA the GPU columns are torch.cuda.memory_allocated / max_memory_allocated / max_memory_reserved "
            "over the measured steps."
            if cuda
            else ""
        ),
        "",
        *analysis(results, cfg, L),
    ]
    return "\n".join(wrap(line) for line in lines) + "\n"


def wrap(line: str, width: int = 118) -> str:
    """Prose wrapped as the rest of docs/benchmarks.md is; table rows and headings left whole."""
    import textwrap

    if not line or line.startswith(("|", "#")):
        return line
    indent = "  " if line.startswith("- ") else ""
    return textwrap.fill(line, width, subsequent_indent=indent, break_long_words=False, break_on_hyphens=False)


def analysis(results: dict[str, dict], cfg: dict, L: dict[str, str]) -> list[str]:
    out = ["Where the time goes:"]
    b, p, n = cfg["batch_size"], cfg["prompt_tokens"], cfg["new_tokens"]
    cached = b * (p + n - 1)  # positions run through the model while generating, with the KV cache
    uncached = b * sum(p + i for i in range(n))  # ... and without it (the whole sequence again every token)
    for kind in ("quickstart", "random"):
        r = results.get(f"{kind}-shared")
        if not r:
            continue
        t = r["total"]
        extra = r["fwd_policy"] + r["fwd_value"] + r["fwd_reference"]
        gen_per_pos = r["generate"] / cached
        fwd_per_pos = (r["fwd_policy"] + r["fwd_value"]) / (b * (p + n))
        out.append(
            f"- {L[kind]}: generation {pct(r['generate'], t)} of the step and the extra no-grad forward passes "
            f"(policy + value, reference) {pct(extra, t)}: {pct(r['generate'] + extra, t)} of the step is rollout "
            f"inference. The training part (forward with grad, backward, optimizer) is {pct(r['train'], t)}, the "
            f"reward {pct(r['reward'], t)}. Generating costs {gen_per_pos / fwd_per_pos:.1f}x a scoring forward per "
            f"position it runs ({ms(gen_per_pos * 1000)} µs against {ms(fwd_per_pos * 1000)} µs): "
            + (
                f"the model is so small that the fixed cost of each of the {n} sequential calls (Python, peft, "
                "one bitsandbytes int8 matmul per layer) outweighs the arithmetic, the regime a GPU is in when "
                "generation is latency-bound."
                if kind == "quickstart"
                else "on a CPU the arithmetic dominates, so with the KV cache generation costs little more than one "
                "forward over the whole sequences; on a GPU the sequential steps are latency-bound and generation's "
                "share is expected to grow."
            )
        )
    copy = results.get("random-copy")
    if copy:
        out.append(
            f"- A separate reference copy buys no speed. In the {L['random']} copy run every reference forward was "
            f"also run the trainer's way (adapter disabled) right after it, on the same inputs, outside the step's "
            f"time: {ms(copy['fwd_reference'])} ms a step through the copy against {ms(copy['shadow_reference'])} ms "
            f"with the adapter disabled; both run the int8 base without LoRA. (Steps in different processes differ "
            f"more than that with the machine's load; compare CPU times across rows.)"
        )
    out += ["", "Memory:"]
    for kind in ("quickstart", "random"):
        shared, copy = results.get(f"{kind}-shared"), results.get(f"{kind}-copy")
        if shared and copy:
            out.append(
                f"- {L[kind]}: the frozen reference copy holds {gib(copy['reference_tensor_bytes'])} of tensors "
                f"and adds {gib(copy['rss_ready'] - shared['rss_ready'])} resident and "
                f"{gib(peak(copy) - peak(shared))} to the step's peak "
                f"({gib(peak(shared))} -> {gib(peak(copy))}): that is what `disable_adapter()` saves. "
                f"The two variants train to the same adapter (LoRA checksums {shared['lora_sum']:.9g} and "
                f"{copy['lora_sum']:.9g}), and over every reference forward of the copy run the copy's log-probs "
                f"and the disabled adapter's "
                + (
                    "are identical (largest difference 0)."
                    if copy["max_reference_diff"] == 0
                    else f"differ by at most {copy['max_reference_diff']:.3g}."
                )
            )
    out.append(
        "- For gpt-neox-20b the copy would be the whole 8-bit model again, about 21 GB (19.9 G int8 weights and "
        "0.62 G fp16 embedding and output-head parameters): more than a 24 GB card has left after the policy."
    )
    r = results.get("random-shared")
    if r:
        out.append(
            f"- {L['random']}, reference from the same weights: the step itself needs "
            f"{gib(peak(r) - r['rss_ready'])} above what is resident ({gib(r['rss_ready'])} -> {gib(peak(r))}): "
            f"the KV cache, the activations kept for backward, and the logits of the {n + 1} scored positions over "
            f"{cfg['random']['vocab_size']} tokens."
        )
    out += [
        "",
        "What makes it fast (all in the trainer, measured above as it runs):",
        f"- Generation is our own sampling loop with a KV cache (`Policy.generate`): each new token runs one "
        f"position through the model, {cached} positions for the batch instead of {uncached} without the cache "
        f"({uncached / cached:.1f}x fewer), and checkpointing is off while generating (it would disable the cache).",
        f"- Only the logits that are used are computed (`logits_to_keep`): the last position while generating and "
        f"the {n + 1} response positions when scoring, never batch x sequence x vocab for the prompt; log-probs and "
        f"entropy are taken in chunks (`rlhf.rl.core.logprobs_from_logits`).",
        "- No `output_hidden_states`: the value head reads the last hidden state through a pre-hook on the output "
        "layer, at exactly the kept positions, so the value costs one small matmul on the policy's own pass (the fwd "
        "value head column) instead of a third forward pass or a tuple of every layer's states.",
        "- The reference is the same weights with the adapter disabled (`Policy.reference`): no second "
        "model to load or hold (see Memory).",
    ]
    if not any(r["device"] == "cuda" for r in results.values()):
        out += [
            "",
            "Not measured here: a GPU. `python benchmarks/ppo_step.py --device cuda --config '{...}'` runs the same "
            "rows there (float16, GPU peaks from torch.cuda.max_memory_reserved) and takes bigger shapes and batches "
            "through `--config` (see the script's docstring).",
        ]
    return out


def write_section(text: str) -> None:
    """Replace the "## PPO step" section of docs/benchmarks.md; other sections belong to other benchmarks."""
    doc = DOC.read_text() if DOC.exists() else "# Benchmarks\n\nMeasured numbers, written by the scripts named.\n"
    pattern = re.compile(r"^## PPO step\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(doc):
        doc = pattern.sub(lambda _: text + "\n", doc).rstrip() + "\n"
    else:
        doc = doc.rstrip() + "\n\n" + text
    DOC.write_text(doc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--config", help="JSON/YAML file or inline JSON overriding the settings (see above)")
    parser.add_argument("--only", nargs="+", choices=sorted(VARIANTS), help="run only these variants")
    parser.add_argument("--workdir", type=Path, help="where the random model is built (default: a temp dir)")
    parser.add_argument("--no-write", action="store_true", help="print the section, do not write docs/benchmarks.md")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--date", default=time.strftime("%Y-%m-%d"))
    parser.add_argument("--from-json", type=Path, help="render the section from a --json file of an earlier run")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    cfg = merged_config(args.config)
    if args.child:
        work = args.workdir
        if args.child == "build":
            result = build_random(work, cfg["random"])
        else:
            result = run_variant(args.child, work, cfg, args.device)
        print("RESULT " + json.dumps(result), flush=True)
        return

    if args.from_json:
        text = section(json.loads(args.from_json.read_text()))
        print(text)
        if not args.no_write:
            write_section(text)
            print(f"wrote the PPO step section of {DOC}")
        return

    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    names = args.only or list(VARIANTS)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="rlhf-ppo-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    passthrough = ["--workdir", str(work), "--device", args.device] + (["--config", args.config] if args.config else [])
    built = None
    results = {}
    try:
        if any(VARIANTS[n][0] == "random" for n in names):
            print("== build random model", flush=True)
            built = child(["--child", "build", *passthrough], args.device)
            (work / "random.json").write_text(json.dumps(built))
        for name in names:
            print(f"== {name}", flush=True)
            results[name] = child(["--child", name, *passthrough], args.device)
            r = results[name]
            print(
                f"   step {r['total']:.2f} s (warm-up {r['warmup_total']:.2f} s), generate {r['generate']:.2f}, "
                f"reward {r['reward']:.2f}, forward {r['forward']:.2f}, train {r['train']:.2f}; "
                f"{r['tokens_per_s']:.0f} tokens/s",
                flush=True,
            )
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    run = {
        "config": cfg,
        "built": built,
        "results": results,
        "wall": time.perf_counter() - started,
        "device": args.device,
        "date": args.date,
        "machine": machine(args.device),
        "load": [load_before, os.getloadavg()[0]],
    }
    if args.json:
        args.json.write_text(json.dumps(run, indent=1))
    text = section(run)
    print(text)
    if not args.no_write:
        write_section(text)
        print(f"wrote the PPO step section of {DOC}")


if __name__ == "__main__":
    main()
