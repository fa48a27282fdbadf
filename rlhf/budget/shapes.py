"""Model shapes without weights: config.json (from a fixture, a local directory, the HF cache, the configs shipped in
rlhf/model_configs/, or the hub) instantiated on the meta device, for exact parameter counts and every Linear's size."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

from rlhf.config import PACKAGE_DIR
from rlhf.errors import UserError


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
