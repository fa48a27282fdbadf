"""Model shapes without weights: config.json (from a fixture, a local directory, the HF cache, the configs shipped in
rlhf/model_configs/, or the hub) instantiated on the meta device, for exact parameter counts and every Linear's size.

Building the meta model means importing torch and transformers: most of the time `rlhf budget` would take. So a shape
is a plain JSON value, computed once per config text:

    shipped   rlhf/model_configs/ORG/NAME/shape.json beside each config.json (benchmarks/write_shapes.py rewrites
              them; a test recomputes each with the installed transformers, so a stale one fails CI)
    cached    CACHE/shapes/KEY.json for any other config (CACHE: $RLHF_CACHE or the user cache dir); KEY hashes the
              config text, the kind of model, trust_remote_code, the installed transformers version and SHAPE_FORMAT
    computed  on the meta device, then cached
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf.config import PACKAGE_DIR
from rlhf.errors import UserError
from rlhf.io import atomic_write_text

SHAPE_FORMAT = 2  # bump when ModelShape's fields or how they are computed change: every cached shape is then redone


def shipped_configs_dir() -> Path:
    return PACKAGE_DIR / "model_configs"


def shipped_config(name: str) -> Path | None:
    """rlhf/model_configs/ORG/NAME/config.json for the hub ids the recipes name (matched case-insensitively)."""
    root = shipped_configs_dir()
    for path in root.glob("*/*/config.json"):
        if str(path.parent.relative_to(root)).lower() == name.lower():
            return path
    return None


def shipped_models() -> list[tuple[str, str, int, int]]:
    """(hub id, model type, parameters, layers) of every model whose shape ships with rlhf, by hub id."""
    root = shipped_configs_dir()
    rows = []
    for path in sorted(root.glob("*/*/shape.json"), key=lambda p: str(p).lower()):
        data = json.loads(path.read_text())
        if data.get("kind") != "causal-lm":
            continue
        config = json.loads(path.with_name("config.json").read_text())
        layers = config.get("num_hidden_layers") or config.get("n_layer") or 0
        rows.append((str(path.parent.relative_to(root)), data["model_type"], int(data["params"]), int(layers)))
    return rows


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
    upcast_norms: int  # norms in one decoder layer that compute on an fp32 copy of their input (RMSNorms)
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
    return _shape(config_path.read_text(), str(config_path), name, kind, trust_remote_code)


@functools.lru_cache(maxsize=32)
def _shape(text: str, config_path: str, name: str, kind: str, trust_remote_code: bool) -> ModelShape:
    """The shipped shape of this config text, else the cached one, else computed (torch) and cached."""
    stored = _shipped_shape(Path(config_path), text, kind)
    if stored is not None:
        return _from_json(stored, name, config_path)
    cache = shape_cache_path(text, kind, trust_remote_code)
    try:
        return _from_json(json.loads(cache.read_text()), name, config_path)
    except (OSError, ValueError, KeyError, TypeError):  # absent, or cut short / of another layout: compute again
        pass
    shape = compute_shape(text, config_path, name, kind, trust_remote_code)
    try:
        atomic_write_text(cache, render_shape(shape, text, kind))
    except OSError:  # a read-only cache only costs the next budget the same wait
        pass
    return shape


def _shipped_shape(config_path: Path, text: str, kind: str) -> dict[str, Any] | None:
    if not config_path.is_relative_to(shipped_configs_dir()):
        return None
    try:
        data = json.loads(config_path.with_name("shape.json").read_text())
    except (OSError, ValueError):
        return None
    fresh = data.get("format") == SHAPE_FORMAT and data.get("config_sha256") == _sha256(text)
    return data if fresh and data.get("kind") == kind else None


def shape_cache_path(text: str, kind: str, trust_remote_code: bool) -> Path:
    """CACHE/shapes/KEY.json: a new transformers (which may build a model differently) or format gets a new key."""
    from importlib.metadata import PackageNotFoundError, version

    from rlhf.fixtures import cache_root

    try:
        transformers = version("transformers")  # the installed version, read without importing it
    except PackageNotFoundError:
        transformers = "none"
    key = _sha256(json.dumps([SHAPE_FORMAT, transformers, kind, trust_remote_code, text]))
    return cache_root() / "shapes" / f"{key}.json"


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


_PER_REQUEST = ("name", "config_path")  # how the shape was asked for, not what the config says


def render_shape(shape: ModelShape, text: str, kind: str) -> str:
    """The shape as JSON: one field a line and one linear a line ([name, in, out, bias, quantized]), so that a
    regenerated shipped file diffs readably; `config_sha256` ties it to the config text it was computed from."""
    head = {"format": SHAPE_FORMAT, "kind": kind, "config_sha256": _sha256(text)}
    fields = {f.name: getattr(shape, f.name) for f in dataclasses.fields(shape) if f.name not in _PER_REQUEST}
    lines = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in head.items()]
    for key, value in fields.items():
        if key in ("linears", "layer_linears"):
            rows = ",\n".join(f"    {json.dumps(dataclasses.astuple(lin))}" for lin in value)
            lines.append(f"  {json.dumps(key)}: [\n{rows}\n  ]")
        else:
            lines.append(f"  {json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def _from_json(data: dict[str, Any], name: str, config_path: str) -> ModelShape:
    fields = {f.name for f in dataclasses.fields(ModelShape)} - set(_PER_REQUEST)
    values = {key: data[key] for key in fields}
    for key in ("linears", "layer_linears"):
        values[key] = tuple(LinearShape(*row) for row in data[key])
    return ModelShape(name=name, config_path=config_path, **values)


def compute_shape(text: str, config_path: str, name: str, kind: str, trust_remote_code: bool) -> ModelShape:
    """The shape of a meta-device instance of the config (imports torch and transformers: seconds)."""
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
    # transformers' RMSNorms (Llama, Qwen2, Mistral, Gemma, Phi-3) cast their input to fp32 and keep that copy for
    # backward; LayerNorm's kernel keeps the input as it is.
    upcast_norms = sum("RMSNorm" in type(m).__name__ for m in blocks[0][0].modules())
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
        upcast_norms=upcast_norms,
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


def shipped_shape_text(config: Path) -> str:
    """What rlhf/model_configs/ORG/NAME/shape.json holds: the shape computed from the config.json beside it, as a
    causal LM (or a sequence classifier for a config whose architecture is one, e.g. the reward model's)."""
    text = config.read_text()
    causal = any(a.endswith("ForCausalLM") for a in json.loads(text).get("architectures", []))
    kind = "causal-lm" if causal else "sequence-classification"
    name = str(config.parent.relative_to(shipped_configs_dir()))
    return render_shape(compute_shape(text, str(config), name, kind, False), text, kind)
