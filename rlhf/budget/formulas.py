"""The bytes of each kind of tensor a step holds, from shapes and settings alone.

What is counted follows what rlhf's code does, not a generic rule of thumb:

weights       quantized linears (LLM.int8: int8 values + one fp32 scale per output row, `SCB`; NF4: 4-bit values +
              an absmax per block of 64, itself quantized to 8 bits with an fp32 absmax per 256 blocks: double
              quant); biases, embeddings and the unembedding in model.dtype (our k-bit preparation, not peft's,
              which would upcast them all to fp32); norms in model.dtype too; buffers as they are.
lora          adapter parameters, fp32 (`modeling.add_lora`).
gradients     fp32, one per trainable parameter (LoRA, and the value head in PPO), while a step is in flight.
optimizer     Adam/AdamW: two fp32 states (8 B/param); bitsandbytes 8-bit: two uint8 states + an fp32 absmax per 256
              values (tensors under 4096 values stay 32-bit).
activations   what autograd keeps, per GPT-NeoX layer and token (d = bytes of model.dtype, h hidden, i intermediate,
              a heads; checked tensor by tensor with saved-tensor hooks):
                layer input d*h; q and k after the rotary embedding d*2h; v d*h (on CUDA sdpa keeps v as a view
                of the fused qkv output, so all of it, d*3h, stays); attention output d*h + fp32 logsumexp 4*a
                (sdpa; eager adds the a*T probabilities, fp32 and in model.dtype); the MLP activation's input
                d*i; two LayerNorms' fp32 mean and rstd; in half precision an RMSNorm keeps an fp32 copy of its
                input, 4*h, instead of it (transformers' RMSNorms compute in fp32); LLM.int8 keeps the input of
                each of its four matmuls, d*(3h + i); each LoRA target keeps an fp32 copy of its input (peft
                casts to the adapter's dtype), plus the dropout mask when lora.dropout > 0.
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
              entropy computed in fp32 one chunk of <= DEFAULT_CHUNK_TOKENS at a time (`rlhf.rl.core`).
kv_cache      generation: 2 x layers x kv heads x head_dim x (prompt + response) x rollout batch x d.
value_head    fp32 Linear(h, 1) and, in the update, the fp32 copy of the hidden states it reads.
reward_model  the classifier's weights (its checkpoint dtype) and inference activations, on the GPU only when its
              spec says device auto/cuda; 0 for device cpu (unless the whole run is on the CPU). A reward learned
              by `rlhf reward` is an adapter on the policy's own weights: its fp32 LoRA and score head, and a
              no-grad forward of a rollout batch (no second model).
overhead      CUDA context (~500 MiB, not part of torch's reserved memory) + allocator fragmentation, taken as a
              fraction of everything that is allocated and freed during a step (added in peak.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from rlhf.budget.shapes import LinearShape, ModelShape, model_shape
from rlhf.dtypes import DTYPE_BYTES


def int8_bytes(lin: LinearShape) -> int:
    """LLM.int8 weight: one int8 per value + one fp32 scale per output row (SCB)."""
    return lin.in_features * lin.out_features + 4 * lin.out_features


def nf4_bytes(n: int) -> int:
    """NF4 with double quant: 4-bit values; per 64-value block a uint8 absmax; per 256 blocks an fp32 absmax; the
    fp32 offset of the quantized absmax."""
    blocks = math.ceil(n / 64)
    return math.ceil(n / 2) + blocks + 4 * math.ceil(blocks / 256) + 4


def weight_bytes(shape: ModelShape, quantization: str, d: int) -> int:
    """The model on the device after `modeling.load_base` + `prepare_for_training` (norms in model.dtype)."""
    total = 0
    for lin in shape.linears:
        if not lin.quantized:
            continue
        n = lin.in_features * lin.out_features
        total += {"8bit": int8_bytes(lin), "4bit": nf4_bytes(n), "none": d * n}[quantization]
        total += d * lin.out_features if lin.bias else 0
    return total + d * (shape.other_params + shape.norm_params) + shape.buffer_bytes


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


def rms_copies(shape: ModelShape, d: int) -> bool:
    """Whether the norms keep fp32 copies of their inputs for backward: transformers' RMSNorms compute in fp32, so in
    half precision each keeps its own fp32 copy (and not its input); in fp32 the copy is the input itself."""
    return d < 4 and shape.upcast_norms > 0


def layer_saved_per_token(shape: ModelShape, s: TrainSetup, seq: int) -> int:
    """Bytes autograd keeps per token for one decoder layer in a training forward (no checkpointing).

    Worked out tensor by tensor for GPT-NeoX (and checked with saved-tensor hooks): see the module docstring.
    """
    h, i, d = shape.hidden, shape.intermediate, s.d
    q_dim, kv_dim = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    if rms_copies(shape, d):
        saved = shape.upcast_norms * 4 * h  # each RMSNorm's fp32 copy of its input, instead of the input
    else:
        saved = d * h  # the layer input: both LayerNorms and the residual read it
    saved += 2 * 2 * 4  # two norms' fp32 mean and rstd
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
    copies = rms_copies(shape, s.d)
    final = 4 * shape.hidden * tokens if copies else hidden  # what the final norm keeps: its input or its fp32 copy
    in_layer = 0 if copies else hidden  # the stored layer input, when the recomputed layer's saved tensors include it
    per_layer = layer_saved_per_token(shape, s, seq) * tokens
    working = backward_working_per_token(shape, s) * tokens + dequant_bytes(shape, s)
    if checkpointing:
        stored = shape.layers * hidden + final
        if s.quantization == "8bit" and not s.reentrant:
            stored += shape.layers * s.d * (3 * shape.hidden + shape.intermediate) * tokens  # int8 ctx.tensors
        return stored, stored + per_layer - in_layer + working
    stored = shape.layers * per_layer + final
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


def kv_cache_bytes(shape: ModelShape, batch: int, seq: int, d: int) -> int:
    """Generation's KV cache: a K and a V per layer, kv head and position (prompt + response), in model.dtype."""
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * seq * batch * d


def chunk_tokens(batch: int, length: int) -> int:
    """Tokens in the largest fp32 chunk `rlhf.rl.core` cuts logits [batch, length, V] into (by its own slicing)."""
    from rlhf.rl.chunks import DEFAULT_CHUNK_TOKENS, chunk_slices

    chunks = chunk_slices(batch, length, DEFAULT_CHUNK_TOKENS)
    return max((len(range(batch)[rows]) * len(range(length)[tokens]) for rows, tokens in chunks), default=0)


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


def reward_adapter_bytes(
    shape: ModelShape, s: TrainSetup, adapter: dict[str, Any], batch: int, seq: int
) -> tuple[int, int, str]:
    """(weights, activations, description) of a reward adapter scored on the policy's base: its fp32 LoRA and score
    head; a no-grad forward of `batch` sequences (a layer's peak, one fp32 copy of a LoRA target's input) and the
    final hidden states the head reads from (no logits)."""
    rank, targets = int(adapter["rank"]), list(adapter["targets"])
    weights = 4 * (lora_params(shape, rank, targets) + shape.hidden + 1)
    tokens = batch * seq
    lora_in = max((lin.in_features for lin in shape.layer_linears if lin.name in targets), default=0)
    per_token = inference_per_token(shape, s) + 4 * lora_in + s.d * shape.hidden
    activations = per_token * tokens + inference_fixed(shape, s)
    where = adapter.get("path") or "planned from reward_model.lora"
    return weights, activations, f"LoRA r={rank} on {','.join(targets)} + score head on the policy's base ({where})"
