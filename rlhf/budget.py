"""The memory budget: what each step holds at its peak, component by component, before anything heavy is loaded.

A 24 GB user's worst hour is a job that dies of OOM after twenty minutes of loading. So every step first predicts its
peak from shapes alone (config.json, a model instantiated on the meta device: exact parameter counts, no weights),
refuses what will not fit, and says the cheapest change that would.

What is counted follows what rlhf's code does, not a generic rule of thumb:

weights       quantized linears (LLM.int8: int8 values + one fp32 scale per output row, `SCB`; NF4: 4-bit values +
              an absmax per block of 64, itself quantized to 8 bits with an fp32 absmax per 256 blocks: double
              quant); biases, embeddings and the unembedding in model.dtype (our k-bit preparation, not peft's,
              which would upcast them all to fp32); LayerNorms in fp32; buffers as they are.
lora          adapter parameters, fp32 (`modeling.add_lora`).
gradients     fp32, one per trainable parameter (LoRA, and the value head in PPO), while a step is in flight.
optimizer     Adam/AdamW: two fp32 states (8 B/param); bitsandbytes 8-bit: two uint8 states + an fp32 absmax per 256
              values (tensors under 4096 values stay 32-bit).
activations   what autograd keeps, per GPT-NeoX layer and token (d = bytes of model.dtype, h hidden, i intermediate,
              a heads; checked tensor by tensor with saved-tensor hooks):
                layer input d*h; q and k after the rotary embedding d*2h; v d*h (on CUDA sdpa keeps v as a view
                of the fused qkv output, so all of it, d*3h, stays); attention output d*h + fp32 logsumexp 4*a
                (sdpa; eager adds the a*T probabilities, fp32 and in model.dtype); the MLP activation's input
                d*i; two LayerNorms' fp32 mean and rstd; LLM.int8 keeps the input of each of its four matmuls,
                d*(3h + i); each LoRA target keeps an fp32 copy of its input (peft casts to the adapter's
                dtype), plus the dropout mask when lora.dropout > 0.
              With gradient checkpointing only each layer's input is stored (d*h per layer and token); the backward
              pass recomputes one layer at a time, and holds that layer's saved tensors, its gradients
              (d*(2h + 2i) per token) and the dequantized weight of its largest quantized linear (bitsandbytes
              dequantizes to compute the input gradient). But bitsandbytes' int8 matmul keeps its input as a
              `ctx` attribute, not through save_for_backward, and *non-reentrant* checkpointing only drops what
              goes through save_for_backward: with it, the int8 inputs, d*(3h + i) per layer and token, stay for
              every layer (3.6 GiB for gpt-neox-20b at 1024 tokens; seen with torch's memory profiler). Reentrant
              checkpointing runs the forward without a graph and keeps none of them. The budget follows the
              choice `rlhf.modeling` makes (`checkpoint_reentrant`).
logits        SFT: transformers' loss upcasts the logits to fp32 and keeps the fp32 log-softmax for backward, whose
              gradient is another fp32 tensor: 12 bytes per batch x sequence x vocab element at the peak.
              PPO: only the response positions' logits (`logits_to_keep`), in model.dtype, with log-probs and
              entropy computed in fp32 one chunk of <= 512 tokens at a time (`rlhf.ppo.core`).
kv_cache      generation: 2 x layers x kv heads x head_dim x (prompt + response) x rollout batch x d.
value_head    fp32 Linear(h, 1) and, in the update, the fp32 copy of the hidden states it reads.
reward_model  the classifier's weights (its checkpoint dtype) and inference activations, on the GPU only when its
              spec says device auto/cuda; 0 for device cpu (unless the whole run is on the CPU).
overhead      CUDA context (~500 MiB, not part of torch's reserved memory) + allocator fragmentation, taken as a
              fraction of everything that is allocated and freed during a step.

A step's moments do not all coexist: PPO's KV cache is freed before the update's activations are made; SFT's fp32
logits are freed before the backward pass reaches the layers. The budget evaluates each moment and reports the
largest; its components sum exactly to the total.
Merge runs on the CPU: RAM (this process + the adapter twice + the largest one-tensor working set, as
`rlhf.merge.predict_peak_ram` says) and disk (the merged shards).
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf.config import PACKAGE_DIR, Recipe
from rlhf.dtypes import DTYPE_BYTES
from rlhf.errors import DoesNotFit, UserError
from rlhf.units import GiB, MiB, format_bytes, parse_size

COMPONENTS = (
    "weights",
    "lora",
    "gradients",
    "optimizer",
    "activations",
    "logits",
    "kv_cache",
    "value_head",
    "reward_model",
    "overhead",
)
STEPS = ("sft", "merge", "ppo")

# Memory torch.cuda.mem_get_info reports as total on each card (the driver keeps the rest of the nominal size).
GPUS = {
    "rtx4090": int(23.64 * GiB),
    "rtx3090": int(23.69 * GiB),
    "a10": int(22.19 * GiB),
    "l4": int(22.17 * GiB),
    "t4": int(14.75 * GiB),
    "a100-40": int(39.50 * GiB),
    "a100-80": int(79.14 * GiB),
    "h100": int(79.10 * GiB),
}

CUDA_CONTEXT = 500 * MiB  # driver context + kernels; outside torch's allocator, so not in max_memory_reserved
FRAGMENTATION = 0.10  # of the bytes allocated and freed during a step (activations, logits, KV cache, gradients)
PROCESS_RAM = 512 * MiB  # Python + torch + transformers, for a planned merge (a live one reads its own RSS)
LOGPROB_CHUNK = 512  # tokens per fp32 chunk in rlhf.ppo.core (DEFAULT_CHUNK_TOKENS)
DEFAULT_REWARD = {"model": "lvwerra/distilbert-imdb", "batch_size": 16, "device": "auto", "max_length": 512}


# --- sizes and devices ------------------------------------------------------------------------------------------


def gpu_bytes(spec: str, source: str = "--gpu") -> int:
    """A GPU name (rtx4090, a100-80, ...) or a size (24GiB, 512MiB, 24GB) in bytes; UserError otherwise."""
    key = spec.strip().lower()
    if key in GPUS:
        return GPUS[key]
    size = parse_size(spec)
    if size is None or size <= 0:
        raise UserError(
            f"{source} '{spec}' is neither a GPU name nor a size; use one of {', '.join(GPUS)}, "
            f"or a size like 24GiB, 512MiB or 24GB"
        )
    return size


@dataclass(frozen=True)
class Device:
    bytes: int
    description: str
    kind: str  # "cuda" (plan for a GPU) or "cpu" (a CPU run: RAM)


def resolve_device(gpu: str | None, recipe: Recipe) -> Device:
    """Precedence: --gpu > the recipe's budget.gpu > the GPU here (its free memory) > free RAM for a CPU run."""
    if gpu:
        return Device(gpu_bytes(gpu), f"{format_bytes(gpu_bytes(gpu))} (--gpu {gpu})", "cuda")
    if recipe.budget.gpu:
        size = gpu_bytes(recipe.budget.gpu, "budget.gpu")
        return Device(size, f"{format_bytes(size)} (recipe budget.gpu: {recipe.budget.gpu})", "cuda")
    import torch

    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        # Querying created this process's CUDA context, which `free` already excludes and the estimate counts.
        usable = min(free + CUDA_CONTEXT, total)
        name = torch.cuda.get_device_name()
        return Device(usable, f"{format_bytes(usable)} free on {name} (of {format_bytes(total)})", "cuda")
    return ram_device()


def ram_device() -> Device:
    import psutil

    available = psutil.virtual_memory().available
    return Device(available, f"{format_bytes(available)} of free RAM (CPU)", "cpu")


def device_memory(gpu: str | None, recipe: Recipe) -> tuple[int, str]:
    """(bytes, description) of the memory to plan against; see `resolve_device` for the precedence."""
    device = resolve_device(gpu, recipe)
    return device.bytes, device.description


# --- model shapes, without weights ------------------------------------------------------------------------------


def shipped_configs_dir() -> Path:
    return PACKAGE_DIR / "model_configs"


def shipped_config(name: str) -> Path | None:
    """rlhf/model_configs/ORG/NAME/config.json for the hub ids the recipes name (matched case-insensitively)."""
    root = shipped_configs_dir()
    for path in root.glob("*/*/config.json"):
        if str(path.parent.relative_to(root)).lower() == name.lower():
            return path
    return None


def find_config(name: str, revision: str | None = None, what: str = "model") -> Path:
    """config.json for a fixture, a local directory, the HF cache, the configs shipped with rlhf, or (last) the hub.

    Only the last touches the network, for one small file.
    """
    from rlhf.resolve import is_fixture, looks_like_hub_id, resolve_model

    if is_fixture(name):
        return resolve_model(name, what=what) / "config.json"
    path = Path(name).expanduser()
    if path.exists():
        return resolve_model(name, what=what) / "config.json"
    if not looks_like_hub_id(name):
        raise UserError(f"{what} '{name}' does not exist; pass an existing directory or a hub id like org/name")
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json", revision=revision)
    if isinstance(cached, str):
        return Path(cached)
    shipped = shipped_config(name)
    if shipped is not None:
        return shipped
    try:
        from huggingface_hub import hf_hub_download

        from rlhf.resolve import hub_token

        return Path(hf_hub_download(name, "config.json", revision=revision, token=hub_token()))
    except Exception:
        root = shipped_configs_dir()
        known = sorted(str(p.parent.relative_to(root)) for p in root.glob("*/*/config.json"))
        raise UserError(
            f"cannot size {what} '{name}': its config.json is not in the Hugging Face cache, not shipped with rlhf "
            f"({', '.join(known)}), and the hub cannot be reached; pass a local model directory instead"
        ) from None


@dataclass(frozen=True)
class LinearShape:
    name: str  # short name, as LoRA's target_modules match it
    in_features: int
    out_features: int
    bias: bool
    quantized: bool  # bitsandbytes converts every nn.Linear except the output embedding


@dataclass(frozen=True)
class ModelShape:
    """What the budget needs to know about a model, read from a meta-device instance of its config."""

    name: str
    config_path: str
    model_type: str
    params: int
    linears: tuple[LinearShape, ...]  # every nn.Linear, the output embedding included (quantized=False)
    layer_linears: tuple[LinearShape, ...]  # those of one decoder layer
    norm_params: int
    buffer_bytes: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    gated_mlp: bool
    fused_qkv: bool
    attn_implementation: str
    checkpoint_dtype: str  # the dtype config.json records (the checkpoint's)

    @property
    def quantized_weight_params(self) -> int:
        return sum(lin.in_features * lin.out_features for lin in self.linears if lin.quantized)

    @property
    def quantized_bias_params(self) -> int:
        return sum(lin.out_features for lin in self.linears if lin.quantized and lin.bias)

    @property
    def other_params(self) -> int:
        """Embeddings, the unembedding and anything else that is neither a quantized linear nor a norm."""
        return self.params - self.quantized_weight_params - self.quantized_bias_params - self.norm_params

    @property
    def largest_quantized_linear(self) -> int:
        return max((lin.in_features * lin.out_features for lin in self.layer_linears if lin.quantized), default=0)


def model_shape(
    name: str,
    revision: str | None = None,
    kind: str = "causal-lm",
    trust_remote_code: bool = False,
    what: str = "model",
) -> ModelShape:
    config_path = find_config(name, revision, what)
    return _shape_from_config(config_path.read_text(), str(config_path), name, kind, trust_remote_code)


@functools.lru_cache(maxsize=32)
def _shape_from_config(text: str, config_path: str, name: str, kind: str, trust_remote_code: bool) -> ModelShape:
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    raw = json.loads(text)
    model_type = raw.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise UserError(
            f"cannot size '{name}': model_type '{model_type}' is not one transformers knows (custom code is not "
            f"instantiated for a budget); pass --gpu and --force to run without the check"
        )
    config = CONFIG_MAPPING[model_type].from_dict(raw)
    auto = AutoModelForCausalLM if kind == "causal-lm" else AutoModelForSequenceClassification
    with torch.device("meta"):
        model = auto.from_config(config, trust_remote_code=trust_remote_code)

    output = model.get_output_embeddings() if kind == "causal-lm" else None
    linears = tuple(
        LinearShape(n.rsplit(".", 1)[-1], m.in_features, m.out_features, m.bias is not None, m is not output)
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear)
    )
    norm_params = sum(
        p.numel() for m in model.modules() if "Norm" in type(m).__name__ for p in m.parameters(recurse=False)
    )
    layers_count = config.num_hidden_layers
    blocks = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == layers_count]
    if not blocks:
        raise UserError(f"cannot size '{name}': no list of {layers_count} decoder layers in {type(model).__name__}")
    layer_linears = tuple(
        LinearShape(n.rsplit(".", 1)[-1], m.in_features, m.out_features, m.bias is not None, True)
        for n, m in blocks[0][0].named_modules()
        if isinstance(m, nn.Linear)
    )
    hidden = config.hidden_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    intermediate = getattr(config, "intermediate_size", None) or max(lin.in_features for lin in layer_linears)
    qkv = heads * head_dim + 2 * kv_heads * head_dim
    dtype = raw.get("dtype") or raw.get("torch_dtype") or "float32"
    return ModelShape(
        name=name,
        config_path=config_path,
        model_type=model_type,
        params=sum(p.numel() for p in model.parameters()),
        linears=linears,
        layer_linears=layer_linears,
        norm_params=norm_params,
        buffer_bytes=sum(b.numel() * b.element_size() for b in model.buffers()),
        hidden=hidden,
        layers=layers_count,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate=intermediate,
        vocab=config.vocab_size,
        gated_mlp=any("gate" in lin.name for lin in layer_linears),
        fused_qkv=any(lin.in_features == hidden and lin.out_features == qkv for lin in layer_linears),
        attn_implementation=getattr(model.config, "_attn_implementation", None) or "sdpa",
        checkpoint_dtype=str(dtype).removeprefix("torch."),
    )


# --- the formulas -----------------------------------------------------------------------------------------------


def int8_bytes(lin: LinearShape) -> int:
    """LLM.int8 weight: one int8 per value + one fp32 scale per output row (SCB)."""
    return lin.in_features * lin.out_features + 4 * lin.out_features


def nf4_bytes(n: int) -> int:
    """NF4 with double quant: 4-bit values; per 64-value block a uint8 absmax; per 256 blocks an fp32 absmax; the
    fp32 offset of the quantized absmax."""
    blocks = math.ceil(n / 64)
    return math.ceil(n / 2) + blocks + 4 * math.ceil(blocks / 256) + 4


def weight_bytes(shape: ModelShape, quantization: str, d: int) -> int:
    """The model on the device after `modeling.load_base` + `prepare_for_training` (LayerNorms cast to fp32)."""
    total = 0
    for lin in shape.linears:
        if not lin.quantized:
            continue
        n = lin.in_features * lin.out_features
        total += {"8bit": int8_bytes(lin), "4bit": nf4_bytes(n), "none": d * n}[quantization]
        total += d * lin.out_features if lin.bias else 0
    return total + d * shape.other_params + 4 * shape.norm_params + shape.buffer_bytes


def lora_params(shape: ModelShape, rank: int, targets: list[str]) -> int:
    return sum(rank * (lin.in_features + lin.out_features) for lin in shape.linears if lin.name in targets)


def optimizer_bytes(tensor_sizes: list[int], eight_bit: bool) -> int:
    """Adam's two states per value: fp32, or bitsandbytes' blockwise uint8 (tensors < 4096 values stay fp32)."""
    total = 0
    for n in tensor_sizes:
        if eight_bit and n >= 4096:
            total += 2 * n + 2 * 4 * math.ceil(n / 256)
        else:
            total += 8 * n
    return total


def lora_tensor_sizes(shape: ModelShape, rank: int, targets: list[str]) -> list[int]:
    sizes = []
    for lin in shape.linears:
        if lin.name in targets:
            sizes += [rank * lin.in_features, rank * lin.out_features]
    return sizes


@dataclass(frozen=True)
class TrainSetup:
    """The settings the activation formulas need."""

    quantization: str
    d: int  # bytes of model.dtype
    lora_rank: int
    lora_targets: tuple[str, ...]
    lora_dropout: float
    device_kind: str  # "cuda" or "cpu": a few saved tensors differ (see layer_saved_per_token)
    reentrant: bool = True  # gradient checkpointing without a graph in forward (see checkpoint_reentrant)


def checkpoint_reentrant() -> bool:
    """Whether rlhf's gradient checkpointing is reentrant: `modeling.CHECKPOINT_KWARGS` when it exists, else what
    `modeling.prepare_for_training` passes to gradient_checkpointing_enable."""
    from rlhf import modeling

    kwargs = getattr(modeling, "CHECKPOINT_KWARGS", None)
    if kwargs is not None:
        return bool(kwargs.get("use_reentrant", True))
    match = re.search(r"use_reentrant\W+(True|False)", inspect.getsource(modeling.prepare_for_training))
    return match is None or match.group(1) == "True"  # transformers' default is reentrant


def layer_saved_per_token(shape: ModelShape, s: TrainSetup, seq: int) -> int:
    """Bytes autograd keeps per token for one decoder layer in a training forward (no checkpointing).

    Worked out tensor by tensor for GPT-NeoX (and checked with saved-tensor hooks): see the module docstring.
    """
    h, i, d = shape.hidden, shape.intermediate, s.d
    q_dim, kv_dim = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    saved = d * h  # the layer input: both LayerNorms and the residual read it
    saved += 2 * 2 * 4  # two LayerNorms' fp32 mean and rstd
    saved += d * (q_dim + kv_dim)  # q and k after the rotary embedding (new tensors)
    if shape.fused_qkv and s.device_kind == "cuda":
        saved += d * (q_dim + 2 * kv_dim)  # v is a view of the fused qkv output, which it keeps alive
    else:
        saved += d * kv_dim
    saved += d * q_dim + 4 * shape.heads  # attention output + fp32 logsumexp per head (sdpa)
    if shape.attn_implementation == "eager":
        saved += shape.heads * seq * (4 + (d if d != 4 else 0))  # fp32 softmax + its cast, both kept
    saved += d * i * (3 if shape.gated_mlp else 1)  # activation input (gated: and its output, and the up branch)
    if s.quantization == "8bit":
        saved += d * (3 * h + i)  # bitsandbytes keeps each int8 matmul's input: ln1, attention context, ln2, act
    for lin in shape.layer_linears:
        if lin.name not in s.lora_targets:
            continue
        n = lin.in_features
        if s.lora_dropout > 0:
            mask = n if s.device_kind == "cuda" else 4 * n  # fused CUDA dropout keeps a bool mask; CPU an fp32 one
            saved += 4 * n + mask  # peft casts the input to fp32; dropout's output is what lora_A keeps
        elif not (s.d == 4 and s.quantization == "8bit"):
            saved += 4 * n  # lora_A keeps its fp32 input (the same tensor int8 keeps when the model is fp32)
        saved += 4 * s.lora_rank  # lora_B keeps lora_A's output
    return saved


def backward_working_per_token(shape: ModelShape, s: TrainSetup) -> int:
    """Gradients alive while one layer is back-propagated: the residual stream's, and the MLP's in and out."""
    lora_in = max((lin.in_features for lin in shape.layer_linears if lin.name in s.lora_targets), default=0)
    return s.d * (2 * shape.hidden + 2 * shape.intermediate) + 4 * lora_in


def dequant_bytes(shape: ModelShape, s: TrainSetup) -> int:
    """bitsandbytes dequantizes a weight to model.dtype to compute the input gradient (and on the CPU, in forward)."""
    return s.d * shape.largest_quantized_linear if s.quantization != "none" else 0


def train_activations(shape: ModelShape, s: TrainSetup, batch: int, seq: int, checkpointing: bool) -> tuple[int, int]:
    """(at the loss, in the backward of the first layer reached) bytes for a training micro-batch, logits excluded.

    With checkpointing: every layer's input (d*h per token) + the final norm's input (+ LLM.int8's matmul inputs
    when checkpointing is not reentrant); in backward one layer is recomputed (its saved tensors, less the stored
    input) next to its gradients and one dequantized weight.
    Without: every layer's saved tensors, the final norm's input, then the gradients and the dequantized weight.
    """
    tokens = batch * seq
    hidden = s.d * shape.hidden * tokens
    per_layer = layer_saved_per_token(shape, s, seq) * tokens
    working = backward_working_per_token(shape, s) * tokens + dequant_bytes(shape, s)
    if checkpointing:
        stored = (shape.layers + 1) * hidden
        if s.quantization == "8bit" and not s.reentrant:
            stored += shape.layers * s.d * (3 * shape.hidden + shape.intermediate) * tokens  # int8 ctx.tensors
        return stored, stored + per_layer - hidden + working
    stored = shape.layers * per_layer + hidden
    return stored, stored + working


def inference_per_token(shape: ModelShape, s: TrainSetup) -> int:
    """Peak bytes per token inside one layer of a no-grad forward (generation, scoring): the attention or the MLP.

    MLP (parallel residual): layer input, attention output, LayerNorm output, the up-projection output, and on CUDA
    LLM.int8's int8 copy of its input and int32 result; then the activation's input and output.
    """
    h, i, d = shape.hidden, shape.intermediate, s.d
    branches = 2 if shape.gated_mlp else 1
    up = d * i * branches
    if s.quantization == "8bit" and s.device_kind == "cuda":
        up += h + 4 * i * branches
    mlp = 3 * d * h + max(up, 2 * d * i * branches)
    attention = d * (h + 3 * h + 2 * h + h + h)  # input, qkv, rotated q and k, output, context
    return max(mlp, attention)


def inference_fixed(shape: ModelShape, s: TrainSetup) -> int:
    """A dequantized weight during a no-grad forward: NF4 always; LLM.int8 on the CPU (CUDA has int8 kernels)."""
    if s.quantization == "4bit" or (s.quantization == "8bit" and s.device_kind == "cpu"):
        return s.d * shape.largest_quantized_linear
    return 0


def chunk_tokens(batch: int, length: int, chunk: int = LOGPROB_CHUNK) -> int:
    """Tokens in one fp32 chunk of `rlhf.ppo.core._chunks` for logits [batch, length, V]."""
    if length <= chunk:
        return min(batch, max(1, chunk // max(length, 1))) * length
    return chunk


# --- the estimate -----------------------------------------------------------------------------------------------


@dataclass
class Estimate:
    """The predicted peak of one step: `components` (those of the `peak` moment) sum to `total_bytes`."""

    model: str
    step: str
    params: int
    device_bytes: int
    components: dict[str, int]
    device: str = ""
    peak: str = ""
    moments: dict[str, dict[str, int]] = field(default_factory=dict)  # each moment's components, overhead included
    settings: str = ""
    notes: list[str] = field(default_factory=list)
    disk_bytes: int | None = None  # merge: the merged shards
    disk_free: int | None = None
    context_bytes: int = 0  # the CUDA context inside `overhead` (not in torch's reserved memory)
    recipe: Recipe | None = field(default=None, repr=False, compare=False)
    reward_spec: dict[str, Any] | None = field(default=None, repr=False, compare=False)
    device_kind: str = "cuda"

    @property
    def total_bytes(self) -> int:
        return sum(self.components.values())

    @property
    def moment_totals(self) -> dict[str, int]:
        return {name: sum(parts.values()) for name, parts in self.moments.items()}

    @property
    def margin(self) -> int:
        return self.device_bytes - self.total_bytes

    @property
    def disk_fits(self) -> bool:
        return self.disk_bytes is None or self.disk_free is None or self.disk_bytes <= self.disk_free

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.device_bytes and self.disk_fits

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "step": self.step,
            "params": self.params,
            "device_bytes": self.device_bytes,
            "total_bytes": self.total_bytes,
            "fits": self.fits,
            "components": {name: int(self.components.get(name, 0)) for name in COMPONENTS},
        }


def load_reward_spec(name: str) -> dict[str, Any]:
    """The reward spec's fields the budget needs (model, batch_size, device, max_length); a distilbert-base-sized
    classifier on the device when the spec cannot be found or read (the step itself reports that error)."""
    from rlhf.rewards import load_spec

    try:
        spec = load_spec(name)
    except UserError:
        return {**DEFAULT_REWARD, "assumed": True}
    if spec.type != "text-classification":
        return {"model": None, "batch_size": 0, "device": "cpu", "max_length": 0, "callable": True}
    fields = {"model": spec.model, "batch_size": spec.batch_size, "device": spec.device, "max_length": spec.max_length}
    return {**DEFAULT_REWARD, **fields}


def _lora_setup(recipe: Recipe, step: str, device_kind: str) -> TrainSetup:
    lora = recipe.ppo.lora if step == "ppo" else recipe.lora
    return TrainSetup(
        quantization=recipe.model.quantization,
        d=DTYPE_BYTES[recipe.model.dtype],
        lora_rank=lora.rank,
        lora_targets=tuple(lora.target_modules),
        lora_dropout=lora.dropout,
        device_kind=device_kind,
        reentrant=checkpoint_reentrant(),
    )


def _finish(moments: dict[str, dict[str, int]], static: tuple[str, ...], device_kind: str) -> tuple[str, dict, int]:
    """Add the overhead to each moment, fill in the components that do not apply (0); return (the peak moment, all
    moments, the CUDA context counted)."""
    context = CUDA_CONTEXT if device_kind == "cuda" else 0
    full = {}
    for name, parts in moments.items():
        dynamic = sum(v for k, v in parts.items() if k not in static)
        full[name] = {k: parts.get(k, 0) for k in COMPONENTS} | {"overhead": context + int(FRAGMENTATION * dynamic)}
    peak = max(full, key=lambda name: sum(full[name].values()))
    return peak, full, context


def _int8_kept_note(shape: ModelShape, s: TrainSetup, tokens: int, checkpointing: bool) -> list[str]:
    if not (checkpointing and s.quantization == "8bit" and not s.reentrant):
        return []
    kept = shape.layers * s.d * (3 * shape.hidden + shape.intermediate) * tokens
    return [
        f"activations include {format_bytes(kept)} of LLM.int8 matmul inputs that non-reentrant gradient "
        f"checkpointing keeps for every layer (use_reentrant=True in rlhf.modeling would free them)"
    ]


def _estimate_sft(recipe: Recipe, shape: ModelShape, device_kind: str) -> tuple[dict, str, list[str]]:
    cfg = recipe.sft
    s = _lora_setup(recipe, "sft", device_kind)
    n_lora = lora_params(shape, s.lora_rank, list(s.lora_targets))
    resident = {
        "weights": weight_bytes(shape, s.quantization, s.d),
        "lora": 4 * n_lora,
        "gradients": 4 * n_lora,  # kept across gradient-accumulation micro-batches
        "optimizer": optimizer_bytes(
            lora_tensor_sizes(shape, s.lora_rank, list(s.lora_targets)), cfg.optimizer == "adamw_8bit"
        ),
    }
    at_loss, at_backward = train_activations(shape, s, cfg.batch_size, cfg.block_size, cfg.gradient_checkpointing)
    logits = 12 * cfg.batch_size * cfg.block_size * shape.vocab  # fp32 upcast + fp32 log-softmax + fp32 gradient
    moments = {
        "loss (fp32 logits)": {**resident, "activations": at_loss, "logits": logits},
        "backward (one layer)": {**resident, "activations": at_backward},
    }
    settings = (
        f"{recipe.model.quantization}, {recipe.model.dtype}; LoRA r={s.lora_rank} on {','.join(s.lora_targets)}; "
        f"micro-batch {cfg.batch_size} x {cfg.block_size} tokens; gradient checkpointing "
        f"{'on' if cfg.gradient_checkpointing else 'off'}; {cfg.optimizer}"
    )
    notes = _int8_kept_note(shape, s, cfg.batch_size * cfg.block_size, cfg.gradient_checkpointing)
    return moments, settings, notes


def reward_bytes(
    spec: dict[str, Any], text_tokens: int, on_device: bool, where: str = "the GPU"
) -> tuple[int, int, str]:
    """(weights, inference activations, description) of the reward classifier on the planned device."""
    if spec.get("callable") or not spec.get("model"):
        return 0, 0, "a Python callable (no model)"
    if not on_device:
        return 0, 0, f"{spec['model']} on the CPU"
    shape = model_shape(spec["model"], kind="sequence-classification", what="reward model")
    d = DTYPE_BYTES.get(spec.get("dtype") or shape.checkpoint_dtype, 4)
    weights = d * shape.params + shape.buffer_bytes
    # The text is the policy's prompt + response, decoded and re-tokenized by the classifier's own tokenizer:
    # allow twice as many tokens (and [CLS]/[SEP]), padded to the longest in a batch, truncated at max_length.
    seq = min(int(spec.get("max_length") or 512), 2 * text_tokens + 2)
    tokens = int(spec.get("batch_size") or 16) * seq
    per_token = d * (3 * shape.hidden + 2 * shape.intermediate)
    if shape.attn_implementation == "eager":
        per_token += 4 * shape.heads * seq
    activations = tokens * per_token + tokens * d * shape.hidden  # + the embeddings' output
    return weights, activations, f"{spec['model']} on {where} ({seq} tokens x batch {spec.get('batch_size')})"


def _estimate_ppo(recipe: Recipe, shape: ModelShape, device_kind: str, spec: dict[str, Any]) -> tuple[dict, str, list]:
    cfg, gen = recipe.ppo, recipe.ppo.generation
    s = _lora_setup(recipe, "ppo", device_kind)
    d, V, h = s.d, shape.vocab, shape.hidden
    prompt, response = cfg.prompt_max_tokens, gen.max_new_tokens
    seq = prompt + response
    rollout = min(cfg.rollout_batch_size, cfg.batch_size)
    micro = max(1, cfg.mini_batch_size // cfg.gradient_accumulation_steps)
    notes = _int8_kept_note(shape, s, micro * seq, cfg.gradient_checkpointing)

    n_lora = lora_params(shape, s.lora_rank, list(s.lora_targets))
    value_params = h + 1
    trainable_sizes = lora_tensor_sizes(shape, s.lora_rank, list(s.lora_targets)) + [h, 1]
    on_device = device_kind == "cpu" or spec.get("device", "auto") != "cpu"
    where = "the GPU" if device_kind == "cuda" else "the CPU, in the same RAM"
    reward_weights, reward_act, reward_note = reward_bytes(spec, seq, on_device, where)
    notes.append(f"reward model: {reward_note}" + (" (spec not found: assumed)" if spec.get("assumed") else ""))
    resident = {
        "weights": weight_bytes(shape, s.quantization, d),  # one copy: the reference is the adapter switched off
        "lora": 4 * n_lora,
        "optimizer": optimizer_bytes(trainable_sizes, cfg.optimizer == "adam_8bit"),
        "value_head": 4 * value_params,
        "reward_model": reward_weights,
    }

    # 1. generation: a rollout batch with its KV cache, one token at a time (prefill: the whole prompt).
    kv = 2 * shape.layers * shape.kv_heads * shape.head_dim * seq * rollout * d
    growth = kv // (2 * shape.layers)  # DynamicCache concatenates: one layer's K (or V) exists twice for a moment
    sampling = rollout * V * (d + 3 * 4)  # the last position's logits, in fp32, / temperature, softmax
    prefill = inference_per_token(shape, s) * rollout * prompt + inference_fixed(shape, s)
    generation = {**resident, "kv_cache": kv, "activations": prefill + growth, "logits": sampling}

    # 2. scoring: policy (values, entropy) then reference, no grad, on a rollout batch; logits of responses only.
    kept = response + 1  # logits_to_keep = response + 1
    chunk = chunk_tokens(rollout, response)
    scoring = {
        **resident,
        "activations": inference_per_token(shape, s) * rollout * seq + inference_fixed(shape, s),
        "logits": rollout * kept * V * d + 5 * 4 * chunk * V,  # + entropy's fp32 chunk: float, log_softmax, exp, ...
        # the last hidden state (a view that keeps the final norm's whole output) and the head's fp32 copy
        "value_head": resident["value_head"] + rollout * seq * h * d + 4 * rollout * response * h,
    }

    # 3. reward: the classifier on decoded texts.
    reward = {**resident, "reward_model": reward_weights + reward_act}

    # 4. update: micro-batches of `micro` sequences, with grad (checkpointing as the recipe says).
    at_loss, at_backward = train_activations(shape, s, micro, seq, cfg.gradient_checkpointing)
    chunk = chunk_tokens(micro, response)
    grads = 4 * (n_lora + value_params)
    head = resident["value_head"] + micro * seq * h * d + 4 * micro * response * h  # hidden kept, fp32 copy saved
    update_logits = micro * kept * V * d
    update_loss = {
        **resident,
        "gradients": grads,
        "activations": at_loss,
        "value_head": head,
        "logits": update_logits + 2 * 4 * chunk * V,
    }
    update_backward = {
        **resident,
        "gradients": grads,
        "activations": at_backward,
        "value_head": head,
        "logits": 2 * update_logits + 4 * 4 * chunk * V,  # logits kept for backward, their gradient, fp32 chunks
    }
    moments = {
        "generation (KV cache)": generation,
        "scoring (policy + reference)": scoring,
        "reward": reward,
        "update (loss)": update_loss,
        "update (backward)": update_backward,
    }
    settings = (
        f"{recipe.model.quantization}, {recipe.model.dtype}; LoRA r={s.lora_rank} on {','.join(s.lora_targets)}; "
        f"rollout {rollout} x ({prompt} + {response}) tokens; micro-batch {micro} (mini-batch {cfg.mini_batch_size}); "
        f"gradient checkpointing {'on' if cfg.gradient_checkpointing else 'off'}; {cfg.optimizer}"
    )
    return moments, settings, notes


def _estimate_merge(recipe: Recipe, shape: ModelShape) -> tuple[dict, int, str]:
    """RAM of `rlhf merge`, as `rlhf.merge.predict_peak_ram` computes it, from shapes instead of the checkpoint."""
    src = DTYPE_BYTES.get(shape.checkpoint_dtype, 4)
    out = DTYPE_BYTES[recipe.merge.dtype]
    targets = set(recipe.lora.target_modules)
    largest = 0
    for lin in shape.linears:
        n = lin.in_features * lin.out_features
        if lin.name in targets:
            largest = max(largest, src * n + 8 * n + out * n + n)  # base, two fp32 scratch, output, a bool mask
        else:
            largest = max(largest, src * n + (out * n if src != out else 0))
    n_lora = lora_params(shape, recipe.lora.rank, list(recipe.lora.target_modules))
    parts = {"weights": largest, "lora": 2 * 4 * n_lora, "overhead": PROCESS_RAM}
    disk = out * shape.params  # non-persistent buffers (rotary frequencies) are not saved
    settings = (
        f"streamed on the CPU, one tensor at a time, to {recipe.merge.dtype} shards of {recipe.merge.max_shard_size}"
    )
    return parts, disk, settings


def estimate(
    recipe: Recipe,
    step: str,
    device_bytes: int | None = None,
    reward_spec: dict | None = None,
    *,
    device_kind: str | None = None,
    device_description: str = "",
    disk_path: Path | str | None = None,
) -> Estimate:
    """The predicted peak memory of `step` (sft | merge | ppo) for `recipe`, against `device_bytes`.

    `device_bytes` None: the device `resolve_device` picks (merge: free RAM). `device_kind`: "cuda" plans for a GPU
    (CUDA context counted; the reward model counts only if its spec puts it on the GPU), "cpu" for a CPU run;
    default "cuda" when `device_bytes` is given. `disk_path`: where merge writes (its free space is checked).
    """
    if step not in STEPS:
        raise UserError(f"step '{step}' is not one of {', '.join(STEPS)}")
    if device_bytes is None:
        device = ram_device() if step == "merge" else resolve_device(None, recipe)
        device_bytes, device_kind = device.bytes, device.kind
        device_description = device_description or device.description
    device_kind = device_kind or ("cpu" if step == "merge" else "cuda")
    device_description = device_description or format_bytes(device_bytes)
    shape = model_shape(recipe.model.name, recipe.model.revision, trust_remote_code=recipe.model.trust_remote_code)
    notes: list[str] = []
    disk = disk_free = None
    context = 0
    if step == "merge":
        parts, disk, settings = _estimate_merge(recipe, shape)
        peak = "merge (largest tensor)"
        moments = {peak: {name: parts.get(name, 0) for name in COMPONENTS}}
        if disk_path is not None:
            existing = next(p for p in [Path(disk_path), *Path(disk_path).resolve().parents] if p.exists())
            disk_free = shutil.disk_usage(existing).free
    else:
        if step == "sft":
            raw, settings, notes = _estimate_sft(recipe, shape, device_kind)
            static = ("weights", "lora", "optimizer")
        else:
            spec = reward_spec if reward_spec is not None else load_reward_spec(recipe.reward.name)
            reward_spec = spec
            raw, settings, notes = _estimate_ppo(recipe, shape, device_kind, spec)
            static = ("weights", "lora", "optimizer", "value_head", "reward_model")
        peak, moments, context = _finish(raw, static, device_kind)
    return Estimate(
        model=recipe.model.name,
        step=step,
        params=shape.params,
        device_bytes=int(device_bytes),
        components=dict(moments[peak]),
        device=device_description,
        peak=peak,
        moments=moments,
        settings=settings,
        notes=notes,
        disk_bytes=disk,
        disk_free=disk_free,
        context_bytes=context,
        recipe=recipe,
        reward_spec=reward_spec,
        device_kind=device_kind,
    )


# --- what would make it fit -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    key: str  # a dotted recipe key, or "reward.device" (a field of the reward spec YAML)
    value: Any
    cost: int  # 1 slower only, 2 nearly the same results, 3 trains on something different, 4 a weaker base
    why: str

    def __str__(self) -> str:
        value = str(self.value).lower() if isinstance(self.value, bool) else self.value
        if self.key == "reward.device":
            return f"reward-spec:device={value}"  # a field of reward_models/NAME.yaml, not a recipe override
        return f"{self.key}={value}"


@dataclass
class Suggestion:
    changes: tuple[Change, ...]
    total_bytes: int
    fits: bool

    @property
    def cost(self) -> int:
        return max(c.cost for c in self.changes)

    @property
    def text(self) -> str:
        return " ".join(str(c) for c in self.changes)


def _set(recipe: Recipe, key: str, value: Any) -> Recipe:
    """recipe with the dotted `key` set (nested model_copy, no other field touched)."""
    head, _, rest = key.partition(".")
    if not rest:
        return recipe.model_copy(update={head: value})
    return recipe.model_copy(update={head: _set(getattr(recipe, head), rest, value)})


def apply_changes(recipe: Recipe, spec: dict | None, changes: tuple[Change, ...]) -> tuple[Recipe, dict | None]:
    for change in changes:
        if change.key == "reward.device":
            spec = {**(spec or DEFAULT_REWARD), "device": change.value}
        else:
            recipe = _set(recipe, change.key, change.value)
    return recipe, spec


def _divisors(n: int) -> list[int]:
    return [k for k in range(n, 0, -1) if n % k == 0]


def _reestimate(est: Estimate, changes: tuple[Change, ...]) -> Estimate:
    recipe, spec = apply_changes(est.recipe, est.reward_spec, changes)
    return estimate(
        recipe, est.step, est.device_bytes, spec, device_kind=est.device_kind, device_description=est.device
    )


def _first_fitting(est: Estimate, base: tuple[Change, ...], options: list[tuple[Change, ...]]) -> tuple[Change, ...]:
    """The mildest of `options` that fits together with `base`; else the strongest (the most memory saved)."""
    for changes in options:
        if _reestimate(est, base + changes).fits:
            return changes
    return options[-1]


EIGHT_BIT_ADAM = "8-bit optimizer states: nearly the same results"


def _knobs(est: Estimate) -> list[list[tuple[Change, ...]]]:
    """What can shrink the step: each knob a list of options (tuples of edits that belong together), mildest first."""
    recipe, knobs = est.recipe, []
    if est.step == "sft":
        cfg = recipe.sft
        if not cfg.gradient_checkpointing:
            knobs.append([(Change("sft.gradient_checkpointing", True, 1, "~30% slower steps, same training"),)])
        effective = cfg.batch_size * cfg.gradient_accumulation_steps
        knobs.append(
            [
                (
                    Change("sft.batch_size", b, 1, "smaller micro-batches, same effective batch: slower"),
                    Change("sft.gradient_accumulation_steps", effective // b, 1, ""),
                )
                for b in _divisors(effective)
                if b < cfg.batch_size
            ]
        )
        if cfg.optimizer == "adamw":
            knobs.append([(Change("sft.optimizer", "adamw_8bit", 2, EIGHT_BIT_ADAM),)])
        knobs.append(
            [
                (Change("sft.block_size", b, 3, "shorter training blocks: less context per example"),)
                for b in (cfg.block_size // 2**k for k in range(1, 8))
                if b >= 64
            ]
        )
    elif est.step == "ppo":
        cfg, gen = recipe.ppo, recipe.ppo.generation
        spec = est.reward_spec or {}
        if spec.get("model") and spec.get("device", "auto") != "cpu" and est.device_kind == "cuda":
            why = f"device: cpu in the reward spec ({recipe.reward.name}): slower scoring"
            knobs.append([(Change("reward.device", "cpu", 1, why),)])
        if not cfg.gradient_checkpointing:
            knobs.append([(Change("ppo.gradient_checkpointing", True, 1, "~30% slower updates, same training"),)])
        micro = cfg.mini_batch_size // cfg.gradient_accumulation_steps
        knobs.append(
            [
                (
                    Change(
                        "ppo.gradient_accumulation_steps",
                        cfg.mini_batch_size // m,
                        1,
                        "smaller micro-batches, same mini-batch: slower updates",
                    ),
                )
                for m in _divisors(cfg.mini_batch_size)
                if m < micro
            ]
        )
        knobs.append(
            [
                (Change("ppo.rollout_batch_size", r, 1, "generate and score fewer sequences at once: slower"),)
                for r in _divisors(cfg.batch_size)
                if r < min(cfg.rollout_batch_size, cfg.batch_size)
            ]
        )
        if cfg.optimizer == "adam":
            knobs.append([(Change("ppo.optimizer", "adam_8bit", 2, EIGHT_BIT_ADAM),)])
        knobs.append(
            [
                (Change("ppo.generation.max_new_tokens", n, 3, "shorter responses"),)
                + ((Change("ppo.generation.min_new_tokens", n, 3, ""),) if gen.min_new_tokens > n else ())
                for n in (gen.max_new_tokens // 2**k for k in range(1, 6))
                if n >= 1
            ]
        )
    else:
        return []
    if recipe.model.quantization != "4bit":
        knobs.append([(Change("model.quantization", "4bit", 4, "NF4 base (QLoRA): some quality loss"),)])
    return [knob for knob in knobs if knob]


def _cost(changes: tuple[Change, ...]) -> int:
    return max(c.cost for c in changes)


def suggest(est: Estimate) -> list[Suggestion]:
    """Changes that shrink the step, each re-estimated and ranked.

    Those that make it fit come first, cheapest first (1 slower only ... 4 a weaker base), then smallest: single
    changes, and the cheapest set of changes that fits together when it is cheaper than any single one. Then the
    single changes that help but are not enough, by what they save.
    """
    if est.recipe is None or est.step == "merge":
        return []
    knobs = _knobs(est)
    singles = []
    for knob in knobs:
        changes = _first_fitting(est, (), knob)
        new = _reestimate(est, changes)
        if new.total_bytes < est.total_bytes:
            singles.append(Suggestion(changes, new.total_bytes, new.fits))
    fitting = [s for s in singles if s.fits]
    together = _combine(est, knobs)
    if together and (not fitting or together.cost < min(s.cost for s in fitting)):
        fitting.append(together)
    fitting.sort(key=lambda s: (s.cost, s.total_bytes))
    return fitting + sorted((s for s in singles if not s.fits), key=lambda s: s.total_bytes)


def _combine(est: Estimate, knobs: list[list[tuple[Change, ...]]]) -> Suggestion | None:
    """The cheapest knobs at their strongest until it fits; then drop the knobs it fits without (dearest first) and
    set each remaining one back to its mildest option that still fits."""
    knobs = sorted(knobs, key=lambda k: _cost(k[-1]))
    chosen: list[int] = []
    for n in range(len(knobs)):
        chosen.append(n)
        if _reestimate(est, sum((knobs[k][-1] for k in chosen), ())).fits:
            break
    else:
        return None
    setting = {k: knobs[k][-1] for k in chosen}
    for k in sorted(chosen, key=lambda k: -_cost(knobs[k][-1])):
        without = sum((v for j, v in setting.items() if j != k), ())
        if _reestimate(est, without).fits:
            del setting[k]
    for k in sorted(setting):
        others = sum((v for j, v in setting.items() if j != k), ())
        setting[k] = _first_fitting(est, others, knobs[k])
    changes = sum((setting[k] for k in sorted(setting)), ())
    if len(setting) < 2:
        return None  # a single change: already among the singles
    new = _reestimate(est, changes)
    return Suggestion(changes, new.total_bytes, new.fits)


# --- reports ----------------------------------------------------------------------------------------------------

_SHRINK = {
    "sft": {
        "weights": "model.quantization=4bit (NF4: ~0.52 B/param)",
        "lora": "lora.rank, lora.target_modules",
        "gradients": "lora.rank, lora.target_modules",
        "optimizer": "sft.optimizer=adamw_8bit (2 B/param instead of 8)",
        "activations": "sft.batch_size (+ gradient_accumulation_steps), sft.block_size, gradient checkpointing",
        "logits": "sft.batch_size, sft.block_size",
        "overhead": "fixed: CUDA context + allocator fragmentation",
    },
    "ppo": {
        "weights": "model.quantization=4bit (NF4: ~0.52 B/param)",
        "lora": "ppo.lora.rank, ppo.lora.target_modules",
        "gradients": "ppo.lora.rank",
        "optimizer": "ppo.optimizer=adam_8bit (2 B/param instead of 8)",
        "activations": "ppo.gradient_accumulation_steps (smaller micro-batch), ppo.rollout_batch_size",
        "logits": "ppo.rollout_batch_size, ppo.generation.max_new_tokens",
        "kv_cache": "ppo.rollout_batch_size, ppo.prompt_max_tokens, ppo.generation.max_new_tokens",
        "value_head": "ppo.rollout_batch_size",
        "reward_model": "device: cpu in the reward spec",
        "overhead": "fixed: CUDA context + allocator fragmentation",
    },
    "merge": {
        "weights": "the largest tensor's working set (base, 2 x fp32, output)",
        "lora": "the adapter, twice (ours and peft's reference)",
        "overhead": "this process: Python, torch, transformers",
    },
}


def render_table(est: Estimate, suggestions: bool = True) -> str:
    total = est.total_bytes
    where = "RAM" if est.step == "merge" else ("RAM (CPU run)" if est.device_kind == "cpu" else "GPU")
    lines = [
        f"memory budget: {est.step} of {est.model} ({est.params:,} parameters)",
        f"  {est.settings}",
        f"  plan for: {est.device}",
        f"  peak: {est.peak}",
        "",
        f"  {'component':<13} {'size':>11} {'share':>6}  what shrinks it",
    ]
    for name in COMPONENTS:
        size = est.components.get(name, 0)
        share = f"{100 * size / total:5.1f}%" if total else "    -"
        hint = _SHRINK.get(est.step, {}).get(name, "") if size else ""
        if name == "overhead" and est.step != "merge" and est.device_kind == "cpu":
            hint = "fixed: allocator fragmentation"
        lines.append(f"  {name:<13} {format_bytes(size):>11} {share}  {hint}".rstrip())
    lines.append(f"  {'total':<13} {format_bytes(total):>11} 100.0%  ({where})")
    if len(est.moments) > 1:
        others = ", ".join(f"{name} {format_bytes(size)}" for name, size in est.moment_totals.items())
        lines.append(f"  each moment: {others}")
    if est.context_bytes:
        lines.append(
            f"  overhead includes the CUDA context ({format_bytes(est.context_bytes)}), outside torch's reserved memory"
        )
    for note in est.notes:
        lines.append(f"  {note}")
    if est.disk_bytes is not None:
        free = f"; free {format_bytes(est.disk_free)}" if est.disk_free is not None else ""
        lines.append(f"  disk: {format_bytes(est.disk_bytes)} for the merged shards{free}")
    lines.append("")
    lines.append(verdict(est))
    if suggestions and not est.fits:
        ranked = suggest(est)
        if ranked:
            lines.append(
                "cheapest changes, each re-estimated (recipe KEY=VALUE overrides; reward-spec: the "
                "reward model's YAML):"
            )
            for n, s in enumerate(ranked, 1):
                status = "fits" if s.fits else "still over"
                why = "; ".join(c.why for c in s.changes if c.why)
                lines.append(f"  {n}. {s.text} -> {format_bytes(s.total_bytes)}, {status} ({why})")
    return "\n".join(lines)


def verdict(est: Estimate) -> str:
    total, device = est.total_bytes, est.device_bytes
    share = f"{100 * abs(est.margin) / device:.1f}%" if device else "-"
    if not est.disk_fits:
        return (
            f"does NOT fit: the merged model needs {format_bytes(est.disk_bytes)} of disk, "
            f"{format_bytes(est.disk_free)} free"
        )
    if est.fits:
        return f"fits: {format_bytes(total)} of {format_bytes(device)}, {format_bytes(est.margin)} ({share}) to spare"
    return (
        f"does NOT fit: needs {format_bytes(total)}, has {format_bytes(device)} "
        f"({format_bytes(-est.margin)} over, {share})"
    )


def main(recipe: Recipe, step: str, gpu: str | None, as_json: bool) -> int:
    """`rlhf budget`: print the table (or JSON) for one step or all; the exit code is 0 whatever the verdict."""
    steps = list(STEPS) if step == "all" else [step]
    estimates = []
    for name in steps:
        device = ram_device() if name == "merge" else resolve_device(gpu, recipe)
        estimates.append(
            estimate(recipe, name, device.bytes, device_kind=device.kind, device_description=device.description)
        )
    if as_json:
        data = [e.to_json() for e in estimates]
        print(json.dumps(data if step == "all" else data[0], indent=2))
    else:
        print("\n\n".join(render_table(e) for e in estimates))
    return 0


def preflight(
    recipe: Recipe, step: str, gpu: str | None, force: bool, out=sys.stdout, disk_path: Path | str | None = None
) -> Estimate:
    """Print the budget for `step`; raise DoesNotFit when it will not fit, unless `force` (then warn and go on)."""
    device = ram_device() if step == "merge" else resolve_device(gpu, recipe)
    est = estimate(
        recipe, step, device.bytes, device_kind=device.kind, device_description=device.description, disk_path=disk_path
    )
    report = render_table(est)
    print(report, file=out, flush=True)
    if est.fits:
        return est
    if force:
        print(
            f"warning: {step} is predicted not to fit ({verdict(est)}); going on because of --force",
            file=out,
            flush=True,
        )
        return est
    ranked = suggest(est)
    hint = next((s for s in ranked if s.fits), None)
    fix = f"; cheapest fix: {hint.text}" if hint else "; see the changes above"
    raise DoesNotFit(
        f"{step} needs {format_bytes(est.total_bytes)} but {est.device} ({verdict(est)}){fix}; "
        f"or pass --force to try anyway",
        report,
    )


def auto_fit(recipe: Recipe, step: str, gpu: str | None) -> Recipe:
    """The recipe with the largest micro-batch that fits, the effective batch kept by gradient accumulation.

    sft: sft.batch_size x sft.gradient_accumulation_steps stays the same. ppo: ppo.mini_batch_size (the sequences
    per optimizer step) stays; its micro-batch (mini_batch_size / gradient_accumulation_steps) is chosen, and when
    generation is what does not fit, ppo.rollout_batch_size is lowered too. Nothing fits: the smallest settings
    (the pre-flight then says so).
    """
    device = resolve_device(gpu, recipe)

    def fits(candidate: Recipe) -> bool:
        return estimate(candidate, step, device.bytes, device_kind=device.kind).fits

    if step == "sft":
        effective = recipe.sft.batch_size * recipe.sft.gradient_accumulation_steps
        options = [
            recipe.model_copy(
                update={
                    "sft": recipe.sft.model_copy(
                        update={"batch_size": b, "gradient_accumulation_steps": effective // b}
                    )
                }
            )
            for b in _divisors(effective)
        ]
    elif step == "ppo":
        ppo = recipe.ppo

        def with_(micro: int, rollout: int) -> Recipe:
            update = {"gradient_accumulation_steps": ppo.mini_batch_size // micro, "rollout_batch_size": rollout}
            return recipe.model_copy(update={"ppo": ppo.model_copy(update=update)})

        micros = _divisors(ppo.mini_batch_size)
        rollouts = [r for r in _divisors(ppo.batch_size) if r <= ppo.rollout_batch_size] or [ppo.batch_size]
        # The update's micro-batch first (with the smallest rollout), then the largest rollout batch beside it.
        micro = next((m for m in micros if fits(with_(m, rollouts[-1]))), micros[-1])
        options = [with_(micro, r) for r in rollouts]
    else:
        return recipe
    return next((candidate for candidate in options if fits(candidate)), options[-1])
