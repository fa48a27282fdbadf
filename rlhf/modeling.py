"""Loading a base model the way every training step needs it: quantized, k-bit prepared, with a LoRA adapter.

The k-bit preparation is ours rather than peft's `prepare_model_for_kbit_training`, which casts every non-int8
parameter to fp32: for gpt-neox-20b that makes the 0.62 B embedding and unembedding parameters fp32 (+1.25 GB).
Norms stay in model.dtype too (see `prepare_for_training`).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from rlhf import targets
from rlhf.checkpointing import CHECKPOINT_KWARGS
from rlhf.config import LoraConfig, ModelConfig
from rlhf.dtypes import torch_dtype
from rlhf.errors import UserError

# bitsandbytes warns on every CPU matmul that fp32 inputs are cast to fp16 for quantization; that is how LLM.int8
# works, not a problem, and thousands of identical lines hide the ones that matter.
warnings.filterwarnings("ignore", message=r"MatMul8bitLt: inputs will be cast")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def require_bitsandbytes(setting: str, instead: str) -> None:
    """UserError naming the recipe setting that needs bitsandbytes, when it cannot be imported here."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # an import failure here means a broken or missing native library
        reason = (str(exc).strip().splitlines() or [""])[0]
        raise UserError(
            f"{setting} needs bitsandbytes, which cannot load here ({type(exc).__name__}: {reason}); "
            f"install bitsandbytes>=0.45 or set {instead}"
        ) from None


def quantization_config(cfg: ModelConfig):
    """The BitsAndBytesConfig for the recipe, or None for an unquantized model."""
    if cfg.quantization == "none":
        return None
    require_bitsandbytes(f"model.quantization={cfg.quantization}", "model.quantization=none")
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=cfg.llm_int8_threshold)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch_dtype(cfg.dtype),
    )


def load_tokenizer(path: Path | str, trust_remote_code: bool = False, chat_template: str | None = None):
    """The model's tokenizer, with a pad id, and with `chat_template` (model.chat_template) when the recipe sets one."""
    from transformers import AutoTokenizer

    from rlhf.chat import set_chat_template

    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    set_chat_template(tokenizer, chat_template)
    if tokenizer.pad_token_id is None:
        # GPT-NeoX has no pad token. Padding is always masked by the attention mask and never by token id, so using
        # EOS as the pad id cannot hide a real EOS from the loss.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base(cfg: ModelConfig, path: Path | str, quantization: str | None = None):
    """The base model from a local directory, quantized as the recipe says, frozen."""
    from transformers import AutoModelForCausalLM

    cfg = cfg.model_copy(update={"quantization": quantization}) if quantization else cfg
    config_path = Path(path) / "config.json"
    if config_path.is_file() and '"quantization_config"' in config_path.read_text():
        raise UserError(f"{path} holds an already-quantized checkpoint; rlhf needs the original fp16/fp32 weights")
    qconfig = quantization_config(cfg)
    kwargs = {}
    if qconfig is not None:
        # bitsandbytes places the quantized weights itself; everything goes on the one device.
        kwargs = {"quantization_config": qconfig, "device_map": {"": device()}}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=torch_dtype(cfg.dtype), trust_remote_code=cfg.trust_remote_code, **kwargs
        )
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise UserError(
                f"{cfg.name} needs code from its repository; if you trust it, set model.trust_remote_code=true"
            ) from None
        raise
    if qconfig is None:
        model.to(device())
    if cfg.quantization == "4bit":
        keep_nf4_trainable(model)
    # Name the base so that plain transformers/peft can load it again from any working directory: a hub id as the
    # user wrote it (not the cache path it was read from), anything local (a directory, a fixture) by absolute path.
    name = cfg.name if _is_hub_id(cfg.name) else str(Path(path).resolve())
    model.config._name_or_path = name
    model.name_or_path = name  # what peft writes as base_model_name_or_path (read from the instance, not config)
    model.requires_grad_(False)
    return model


def keep_nf4_trainable(model) -> int:
    """Keep every NF4 layer on the path it trains on, in every mode; returns how many layers that concerned.

    On a CPU with AVX512-BF16, bitsandbytes 0.50 repacks a Linear4bit's weight in place into an inference-only layout
    the first time it runs in eval mode without grad, and the layout stays when training resumes: the training
    forward then runs a kernel without autograd (a tiny Llama's adapters got no gradient at all) or fails on
    `result += bias` (GPT-NeoX). Generation, evaluation and the reward's scoring all run in eval mode, so no layer
    may pack; unpacked, generation also computes exactly the scoring pass's log-probs. CUDA never packs.
    """
    switched = 0
    for module in model.modules():
        if type(module).__name__ == "Linear4bit" and getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            switched += 1
    return switched


def _is_hub_id(name: str) -> bool:
    from rlhf.resolve import is_fixture, looks_like_hub_id

    return looks_like_hub_id(name) and not is_fixture(name) and not Path(name).expanduser().exists()


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or "RMSNorm" in type(module).__name__


def prepare_for_training(model, gradient_checkpointing: bool) -> None:
    """k-bit preparation: norms and embeddings in model.dtype, checkpointing without the KV cache."""
    dtype = model.get_input_embeddings().weight.dtype
    for module in filter(is_norm, model.modules()):
        # Norms in model.dtype, not fp32: an fp32 norm hands fp32 hidden states to half-precision weights (a Llama
        # stops at lm_head) and an fp32 LayerNorm weight meets fp16 input, which CUDA's kernel refuses. Of fp32 norms
        # cast back, autocast, and this, measured on 8-bit models (docs/memory.md, 2026-12-07): all finite, log-probs
        # within ~0.001 nat (mean) of each other (the kernels and RMSNorms compute in fp32 anyway), this the least
        # memory and 1.5-2.9x faster on the CPU.
        module.to(dtype)
    if gradient_checkpointing:
        # With a frozen embedding no tensor entering the first checkpointed block requires grad, and reentrant
        # checkpointing then silently produces no gradients for the adapters (the PEFT pitfall).
        model.enable_input_require_grads()
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns, then goes
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=CHECKPOINT_KWARGS)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=CHECKPOINT_KWARGS)
        model.config.use_cache = False


def linear_layer_names(model) -> list[str]:
    """Short names of the linear layers LoRA can target (quantized ones included), the output head left out."""
    output = model.get_output_embeddings()
    names = set()
    for name, module in model.named_modules():
        if module is not output and (
            isinstance(module, nn.Linear) or type(module).__name__ in {"Linear8bitLt", "Linear4bit"}
        ):
            names.add(name.split(".")[-1])
    return sorted(names)


def resolve_targets(model, cfg: LoraConfig) -> list[str]:
    """The short names of the layers `cfg.target_modules` adapts in this model; an unknown name is a UserError that
    lists the model's linear layers."""
    return targets.resolve_targets(cfg.target_modules, model.config.model_type, linear_layer_names(model))


def lora_config(cfg: LoraConfig, target_modules: list[str]):
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=target_modules,
        bias=cfg.bias,
        use_rslora=cfg.use_rslora,
        task_type="CAUSAL_LM",
    )


def add_lora(model, cfg: LoraConfig, adapter_name: str = "default"):
    """Wrap the frozen base with a trainable LoRA adapter; adapter weights are fp32 (fp16 ones go NaN in PPO)."""
    from peft import get_peft_model

    config = lora_config(cfg, resolve_targets(model, cfg))
    peft_model = get_peft_model(model, config, adapter_name=adapter_name, autocast_adapter_dtype=True)
    for param in peft_model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    return peft_model


def adapter_targets(peft_model, adapter_name: str = "default") -> list[str]:
    """The short names of the layers an adapter of this PEFT model adapts, as peft recorded them."""
    return sorted(peft_model.peft_config[adapter_name].target_modules)


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; an int8/4-bit weight counts as the number of values it stands for."""
    trainable = total = 0
    for param in model.parameters():
        n = param.numel()
        if type(param).__name__ == "Params4bit":
            n = int(torch.Size(param.quant_state.shape).numel()) if param.quant_state is not None else n * 2
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total
