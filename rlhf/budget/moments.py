"""Each step's moments and what the device holds at each, component by component (overhead aside: see peak.py).

sft:    loss (the fp32 logits)       backward (one layer recomputed, its gradients)
reward: loss (scores of a micro-batch of pairs)                      backward (one layer recomputed, its gradients)
dpo:    reference (no grad, answer logits)   loss (policy's answer logits)   backward (one layer recomputed, logits)
ppo:    generation (KV cache)        scoring (policy + reference)     reward     update (loss)     update (backward)
grpo:   the same moments, without the value head; batch_size x group_size sequences a step
merge: one moment, on the CPU: the largest tensor's working set, the adapter twice, this process

The moments do not all coexist: PPO's KV cache is freed before the update's activations are made; SFT's fp32 logits
are freed before the backward pass reaches the layers. The estimate takes the largest.
"""

from __future__ import annotations

from typing import Any

from rlhf.budget.formulas import (
    TrainSetup,
    chunk_tokens,
    inference_fixed,
    inference_per_token,
    kv_cache_bytes,
    lora_params,
    lora_tensor_sizes,
    optimizer_bytes,
    reward_adapter_bytes,
    reward_bytes,
    train_activations,
    weight_bytes,
)
from rlhf.budget.lengths import DataLengths
from rlhf.budget.shapes import ModelShape
from rlhf.config import LoraConfig, Recipe
from rlhf.dtypes import DTYPE_BYTES
from rlhf.targets import resolve_targets
from rlhf.units import MiB, format_bytes

PROCESS_RAM = 512 * MiB  # Python + torch + transformers, for a planned merge (a live one reads its own RSS)


def checkpoint_reentrant() -> bool:
    """Whether rlhf's gradient checkpointing is reentrant: what `modeling` passes to gradient_checkpointing_enable
    (`rlhf.checkpointing.CHECKPOINT_KWARGS`; transformers' default is reentrant)."""
    from rlhf import checkpointing

    return bool(checkpointing.CHECKPOINT_KWARGS.get("use_reentrant", True))


def lora_targets(shape: ModelShape, lora: LoraConfig) -> list[str]:
    """The layers `modeling.add_lora` adapts: the recipe's setting resolved against the model's linear layers (the
    output embedding, the one linear bitsandbytes leaves unquantized, is never a target)."""
    return resolve_targets(lora.target_modules, shape.model_type, [lin.name for lin in shape.linears if lin.quantized])


def _lora_setup(recipe: Recipe, shape: ModelShape, step: str, device_kind: str) -> TrainSetup:
    lora = {
        "ppo": recipe.ppo.lora,
        "grpo": recipe.grpo.lora,
        "reward": recipe.reward_model.lora,
        "dpo": recipe.dpo.lora,
    }
    lora = lora.get(step, recipe.lora)
    return TrainSetup(
        quantization=recipe.model.quantization,
        d=DTYPE_BYTES[recipe.model.dtype],
        lora_rank=lora.rank,
        lora_targets=tuple(lora_targets(shape, lora)),
        lora_dropout=lora.dropout,
        device_kind=device_kind,
        reentrant=checkpoint_reentrant(),
    )


def _int8_kept_note(shape: ModelShape, s: TrainSetup, tokens: int, checkpointing: bool) -> list[str]:
    if not (checkpointing and s.quantization == "8bit" and not s.reentrant):
        return []
    kept = shape.layers * s.d * (3 * shape.hidden + shape.intermediate) * tokens
    return [
        f"activations include {format_bytes(kept)} of LLM.int8 matmul inputs that non-reentrant gradient "
        f"checkpointing keeps for every layer (use_reentrant=True in rlhf.modeling would free them)"
    ]


def sft_moments(
    recipe: Recipe, shape: ModelShape, device_kind: str, lengths: DataLengths | None = None
) -> tuple[dict, str, list[str]]:
    """({moment: {component: bytes}}, the settings line, notes) of `rlhf sft`: a micro-batch at the loss and in the
    backward pass. Its sequences are sft.block_size long, or, for pairs and conversations padded per batch, as long
    as the data's longest (`lengths`)."""
    cfg = recipe.sft
    seq = min(cfg.block_size, lengths.sft_tokens) if lengths and lengths.sft_tokens else cfg.block_size
    s = _lora_setup(recipe, shape, "sft", device_kind)
    n_lora = lora_params(shape, s.lora_rank, list(s.lora_targets))
    resident = {
        "weights": weight_bytes(shape, s.quantization, s.d),
        "lora": 4 * n_lora,
        "gradients": 4 * n_lora,  # kept across gradient-accumulation micro-batches
        "optimizer": optimizer_bytes(
            lora_tensor_sizes(shape, s.lora_rank, list(s.lora_targets)), cfg.optimizer == "adamw_8bit"
        ),
    }
    at_loss, at_backward = train_activations(shape, s, cfg.batch_size, seq, cfg.gradient_checkpointing)
    logits = 12 * cfg.batch_size * seq * shape.vocab  # fp32 upcast + fp32 log-softmax + fp32 gradient
    moments = {
        "loss (fp32 logits)": {**resident, "activations": at_loss, "logits": logits},
        "backward (one layer)": {**resident, "activations": at_backward},
    }
    settings = (
        f"{recipe.model.quantization}, {recipe.model.dtype}; LoRA r={s.lora_rank} on {','.join(s.lora_targets)}; "
        f"micro-batch {cfg.batch_size} x {seq} tokens{f' ({lengths.source})' if seq != cfg.block_size else ''}; "
        f"gradient checkpointing "
        f"{'on' if cfg.gradient_checkpointing else 'off'}; {cfg.optimizer}"
    )
    notes = _int8_kept_note(shape, s, cfg.batch_size * seq, cfg.gradient_checkpointing)
    return moments, settings, notes


def reward_moments(recipe: Recipe, shape: ModelShape, device_kind: str) -> tuple[dict, str, list[str]]:
    """({moment: {component: bytes}}, the settings line, notes) of `rlhf reward`: a micro-batch of pairs (chosen and
    rejected in one forward, each max_length tokens at most) at the loss and in the backward pass. No logits: the
    score head reads the decoder's last hidden state; the head (hidden + 1 fp32 values) counts with the LoRA."""
    cfg = recipe.reward_model
    s = _lora_setup(recipe, shape, "reward", device_kind)
    n_trainable = lora_params(shape, s.lora_rank, list(s.lora_targets)) + shape.hidden + 1
    sizes = lora_tensor_sizes(shape, s.lora_rank, list(s.lora_targets)) + [shape.hidden, 1]
    resident = {
        "weights": weight_bytes(shape, s.quantization, s.d),
        "lora": 4 * n_trainable,
        "gradients": 4 * n_trainable,  # kept across gradient-accumulation micro-batches
        "optimizer": optimizer_bytes(sizes, cfg.optimizer == "adamw_8bit"),
    }
    sequences = 2 * cfg.batch_size
    at_loss, at_backward = train_activations(shape, s, sequences, cfg.max_length, cfg.gradient_checkpointing)
    moments = {
        "loss (pair scores)": {**resident, "activations": at_loss},
        "backward (one layer)": {**resident, "activations": at_backward},
    }
    settings = (
        f"{recipe.model.quantization}, {recipe.model.dtype}; LoRA r={s.lora_rank} on {','.join(s.lora_targets)} + "
        f"score head; micro-batch {cfg.batch_size} pairs = {sequences} x {cfg.max_length} tokens; gradient "
        f"checkpointing {'on' if cfg.gradient_checkpointing else 'off'}; {cfg.optimizer}"
    )
    notes = _int8_kept_note(shape, s, sequences * cfg.max_length, cfg.gradient_checkpointing)
    return moments, settings, notes


def dpo_moments(recipe: Recipe, shape: ModelShape, device_kind: str) -> tuple[dict, str, list[str]]:
    """({moment: {component: bytes}}, the settings line, notes) of `rlhf dpo`: a micro-batch of pairs (chosen and
    rejected in one forward, max_length tokens a side at most) first through the reference (the adapter off, no
    graph: its activations are freed before the policy's are made), then through the policy at the loss and in the
    backward pass. Logits are kept for the answer positions only (at most max_length - 1 of them), the log-probs taken
    in fp32 chunks, as PPO's update does."""
    cfg = recipe.dpo
    s = _lora_setup(recipe, shape, "dpo", device_kind)
    d, V = s.d, shape.vocab
    n_lora = lora_params(shape, s.lora_rank, list(s.lora_targets))
    resident = {
        "weights": weight_bytes(shape, s.quantization, d),  # one copy: the reference is the adapter switched off
        "lora": 4 * n_lora,
        "optimizer": optimizer_bytes(
            lora_tensor_sizes(shape, s.lora_rank, list(s.lora_targets)), cfg.optimizer == "adamw_8bit"
        ),
    }
    sequences, seq = 2 * cfg.batch_size, cfg.max_length
    answer = seq  # the answer positions' logits, with the one before the first answer token (logits_to_keep)
    chunk = chunk_tokens(sequences, answer)
    grads = 4 * n_lora  # kept across gradient-accumulation micro-batches
    reference = {
        **resident,
        "gradients": grads,  # the earlier micro-batches' gradients are already there
        "activations": inference_per_token(shape, s) * sequences * seq + inference_fixed(shape, s),
        "logits": sequences * answer * V * d + 2 * 4 * chunk * V,
    }
    at_loss, at_backward = train_activations(shape, s, sequences, seq, cfg.gradient_checkpointing)
    logits = sequences * answer * V * d
    backward_chunks = 2 if chunk == sequences * answer else 3  # as PPO's update (rl_moments)
    moments = {
        "reference (no grad)": reference,
        "loss (policy log-probs)": {
            **resident,
            "gradients": grads,
            "activations": at_loss,
            "logits": logits + 8 * chunk * V,
        },
        "backward (one layer)": {
            **resident,
            "gradients": grads,
            "activations": at_backward,
            "logits": 2 * logits + backward_chunks * 4 * chunk * V,  # logits kept, their gradient, fp32 chunks
        },
    }
    settings = (
        f"{recipe.model.quantization}, {recipe.model.dtype}; LoRA r={s.lora_rank} on {','.join(s.lora_targets)}; "
        f"micro-batch {cfg.batch_size} pairs = {sequences} x {seq} tokens, reference = adapter off; gradient "
        f"checkpointing {'on' if cfg.gradient_checkpointing else 'off'}; {cfg.optimizer}"
    )
    notes = _int8_kept_note(shape, s, sequences * seq, cfg.gradient_checkpointing)
    if cfg.judge:
        notes.append(f"not counted: the judged generation eval before and after training (dpo.judge: {cfg.judge})")
    return moments, settings, notes


def ppo_moments(
    recipe: Recipe, shape: ModelShape, device_kind: str, spec: dict[str, Any], lengths: DataLengths | None = None
) -> tuple[dict, str, list]:
    """({moment: {component: bytes}}, the settings line, notes) of `rlhf ppo`, moment by moment as a PPO step runs;
    `spec` is the reward model's (`peak.load_reward_spec`)."""
    return rl_moments(recipe, "ppo", shape, device_kind, spec, lengths)


def grpo_moments(
    recipe: Recipe, shape: ModelShape, device_kind: str, spec: dict[str, Any], lengths: DataLengths | None = None
) -> tuple[dict, str, list]:
    """The moments of `rlhf grpo`: PPO's passes without the value head (neither its weights nor the hidden states it
    reads), over batch_size x group_size sequences a step, generated and scored rollout_batch_size at a time."""
    return rl_moments(recipe, "grpo", shape, device_kind, spec, lengths)


def rl_moments(
    recipe: Recipe, step: str, shape: ModelShape, device_kind: str, spec: dict[str, Any],
    lengths: DataLengths | None = None,
) -> tuple[dict, str, list]:  # fmt: skip
    """The moments of an RL step after merge (`step`: ppo, or grpo without a value head)."""
    cfg = getattr(recipe, step)
    gen = cfg.generation
    s = _lora_setup(recipe, shape, step, device_kind)
    d, V, h = s.d, shape.vocab, shape.hidden
    # Prompts: the data's longest where measured; else a prompt dataset's max_prompt_tokens, or the document prefixes'
    # prompt_max_tokens.
    if lengths and lengths.prompt_tokens:
        prompt = lengths.prompt_tokens
    elif cfg.dataset is not None and cfg.max_prompt_tokens:
        prompt = cfg.max_prompt_tokens
    else:
        prompt = cfg.prompt_max_tokens
    response = gen.max_new_tokens
    seq = prompt + response
    sequences = cfg.batch_size * getattr(cfg, "group_size", 1)
    rollout = min(cfg.rollout_batch_size, sequences)
    micro = max(1, cfg.mini_batch_size // cfg.gradient_accumulation_steps)
    notes = _int8_kept_note(shape, s, micro * seq, cfg.gradient_checkpointing)

    n_lora = lora_params(shape, s.lora_rank, list(s.lora_targets))
    has_value_head = step == "ppo"
    value_params = h + 1 if has_value_head else 0
    trainable_sizes = lora_tensor_sizes(shape, s.lora_rank, list(s.lora_targets)) + ([h, 1] if has_value_head else [])
    on_device = device_kind == "cpu" or spec.get("device", "auto") != "cpu"
    where = "the GPU" if device_kind == "cuda" else "the CPU, in the same RAM"
    if spec.get("adapter"):  # a learned reward: an adapter on the policy's own weights, scored a rollout batch a time
        reward_weights, reward_act, reward_note = reward_adapter_bytes(shape, s, spec["adapter"], rollout, seq)
    else:
        reward_weights, reward_act, reward_note = reward_bytes(spec, seq, on_device, where)
    notes.append(f"reward model: {reward_note}" + (" (spec not found: assumed)" if spec.get("assumed") else ""))
    if judge := spec.get("judge"):  # the classifier that decides `positive`, run after the reward
        judge_on_device = device_kind == "cpu" or judge.get("device", "auto") != "cpu"
        judge_weights, judge_act, judge_note = reward_bytes(judge, seq, judge_on_device, where)
        reward_weights, reward_act = reward_weights + judge_weights, max(reward_act, judge_act)
        notes.append(f"judge of `positive`: {judge_note}")
    resident = {
        "weights": weight_bytes(shape, s.quantization, d),  # one copy: the reference is the adapter switched off
        "lora": 4 * n_lora,
        "optimizer": optimizer_bytes(trainable_sizes, cfg.optimizer == "adam_8bit"),
        "value_head": 4 * value_params,
        "reward_model": reward_weights,
    }

    # 1. generation: a rollout batch with its KV cache, one token at a time (prefill: the whole prompt).
    kv = kv_cache_bytes(shape, rollout, seq, d)
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
        # + entropy's four fp32 chunks at once: log_softmax, its exp, the masked log-probs, their product
        "logits": rollout * kept * V * d + 4 * 4 * chunk * V,
        # the last hidden state (a view that keeps the final norm's whole output) and the head's fp32 copy
        "value_head": resident["value_head"] + (rollout * seq * h * d + 4 * rollout * response * h) * has_value_head,
    }

    # 3. reward: the classifier on decoded texts.
    reward = {**resident, "reward_model": reward_weights + reward_act}

    # 4. update: micro-batches of `micro` sequences, with grad (checkpointing as the recipe says).
    at_loss, at_backward = train_activations(shape, s, micro, seq, cfg.gradient_checkpointing)
    chunk = chunk_tokens(micro, response)
    # the log-prob backward holds two fp32 chunks (x - logsumexp, its exp), and the previous chunk's gradient until the
    # next replaces it when there are several (measured with torch's memory profiler, fp16 and fp32 logits alike)
    backward_chunks = 2 if chunk == micro * response else 3
    forward_chunks, logits_grads = 2, 1
    if cfg.entropy_coef > 0:
        # An entropy bonus (rlhf.rl.core._Entropy) saves no fp32 [B, T, V] tensor, but its forward holds four fp32
        # chunks at once (as scoring's), its backward recomputes p and log p in up to three, and its gradient of the
        # logits exists beside the log-probs' until autograd adds the two.
        forward_chunks, logits_grads, backward_chunks = 4, 2, max(backward_chunks, 3)
    grads = 4 * (n_lora + value_params)
    # the value head's input kept (a view of the final norm's output) and its saved fp32 copy
    head = resident["value_head"] + (micro * seq * h * d + 4 * micro * response * h) * has_value_head
    update_logits = micro * kept * V * d
    update_loss = {
        **resident,
        "gradients": grads,
        "activations": at_loss,
        "value_head": head,
        "logits": update_logits + forward_chunks * 4 * chunk * V,
    }
    update_backward = {
        **resident,
        "gradients": grads,
        "activations": at_backward,
        "value_head": head,
        # logits kept, their gradient(s), fp32 chunks
        "logits": (1 + logits_grads) * update_logits + backward_chunks * 4 * chunk * V,
    }
    moments = {
        "generation (KV cache)": generation,
        "scoring (policy + reference)": scoring,
        "reward": reward,
        "update (loss)": update_loss,
        "update (backward)": update_backward,
    }
    groups = f" of {cfg.batch_size} prompts x {cfg.group_size} samples" if step == "grpo" else ""
    settings = (
        f"{recipe.model.quantization}, {recipe.model.dtype}; LoRA r={s.lora_rank} on {','.join(s.lora_targets)}; "
        f"rollout {rollout} x ({prompt} + {response}) tokens{groups}"
        f"{f' (prompts: {lengths.source})' if lengths and lengths.prompt_tokens else ''}; micro-batch {micro} "
        f"(mini-batch {cfg.mini_batch_size}); "
        f"gradient checkpointing {'on' if cfg.gradient_checkpointing else 'off'}; {cfg.optimizer}"
    )
    return moments, settings, notes


def merge_ram(recipe: Recipe, shape: ModelShape) -> tuple[dict, int, str]:
    """RAM of `rlhf merge` by the merge's own formula (`rlhf.merge.ram`), from shapes instead of the checkpoint: its
    Linear weights (the largest tensors), the fp32 SFT adapter, and PROCESS_RAM for the process a live merge reads.
    Returns (components, the bytes of the merged shards on disk, the settings line)."""
    from rlhf.merge.ram import peak_ram_parts, working_set_bytes

    src = DTYPE_BYTES.get(shape.checkpoint_dtype, 4)
    out = DTYPE_BYTES[recipe.merge.dtype]
    cast = shape.checkpoint_dtype != recipe.merge.dtype
    targets = lora_targets(shape, recipe.lora)
    rounded = recipe.merge.base_weights == "dequantized"  # every quantized linear goes through NF4 and back
    largest = max(
        (
            working_set_bytes(
                lin.in_features * lin.out_features,
                src,
                out,
                merged=lin.name in targets,
                cast=cast,
                rounded=rounded and lin.quantized,
            )
            for lin in shape.linears
        ),
        default=0,
    )
    adapter = 4 * lora_params(shape, recipe.lora.rank, targets)
    ram = peak_ram_parts(PROCESS_RAM, adapter, largest)
    parts = {"weights": ram["tensor"], "lora": ram["adapters"], "overhead": ram["process"]}
    disk = out * shape.params  # non-persistent buffers (rotary frequencies) are not saved
    settings = (
        f"streamed on the CPU, one tensor at a time, to {recipe.merge.dtype} shards of {recipe.merge.max_shard_size}"
        + ("; into the NF4-dequantized weights" if rounded else "")
    )
    return parts, disk, settings
