"""A PEFT LoRA adapter read for merging: which adapters can be merged exactly, their A/B pairs and scaling, and which
base checkpoint tensor each of their tensors belongs to."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlhf.errors import UserError
from rlhf.resolve import looks_like_hub_id
from rlhf.tensorfiles import TensorEntry

PEFT_PREFIX = "base_model.model."
LORA_KEY = re.compile(r"(?P<module>.+)\.(?P<part>lora_A|lora_B)\.(?P<param>weight|bias)")
EMBEDDING_KEY = re.compile(r"(?P<module>.+)\.lora_embedding_(?P<part>A|B)")
# Initialisations that change the base weights during training (W_res = W - B A): the adapter is only valid with the
# changed base, which the checkpoint does not have.
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


@dataclass
class LoraPair:
    a: torch.Tensor | None = None
    b: torch.Tensor | None = None
    b_bias: torch.Tensor | None = None
    embedding: bool = False


@dataclass
class Adapter:
    dir: Path
    config: dict[str, Any]
    pairs: dict[str, LoraPair]  # peft's module name (no base_model.model. prefix) -> its LoRA tensors
    full: dict[str, torch.Tensor]  # tensors saved whole (bias="all", modules_to_save): they replace the base's
    nbytes: int


def adapter_config(adapter_dir: Path) -> dict[str, Any]:
    path = adapter_dir / "adapter_config.json"
    if not path.is_file():
        raise UserError(f"{adapter_dir} is not a PEFT adapter (no adapter_config.json)")
    return json.loads(path.read_text())


def check_supported(adapter_dir: Path, config: dict[str, Any]) -> None:
    """Refuse adapters whose merge is not W + scaling * B @ A on the original base, naming the setting."""
    from peft import LoraConfig

    if config.get("peft_type") != "LORA":
        raise UserError(f"{adapter_dir} is a {config.get('peft_type')} adapter; rlhf merge merges LoRA adapters only")
    if config.get("use_dora"):
        raise UserError(
            f"{adapter_dir} is a DoRA adapter (use_dora: true): its magnitude vector rescales whole weights, which "
            f"rlhf merge does not merge exactly; train a plain LoRA (use_dora false)"
        )
    # peft tags every LoRA variant (VeLoRA, aLoRA, Arrow, ...) in LoraConfig's field metadata.
    variants = [f.name for f in dataclasses.fields(LoraConfig) if f.metadata.get("is_lora_variant")]
    unsupported = [*variants, "layer_replication", "target_parameters", "trainable_token_indices", "use_qalora"]
    for name in unsupported:
        if config.get(name):
            raise UserError(
                f"{adapter_dir} uses {name} = {config[name]!r}, which rlhf merge cannot merge exactly into the base "
                f"weights; train a plain LoRA"
            )
    init = config.get("init_lora_weights")
    init_variants = next(f for f in dataclasses.fields(LoraConfig) if f.name == "init_lora_weights").metadata
    if isinstance(init, str) and (init.startswith(BASE_CHANGING_INITS) or init in init_variants["lora_variants"]):
        raise UserError(
            f"{adapter_dir} was initialised with init_lora_weights = '{init}', which changes the base weights during "
            f"training; the original checkpoint plus this adapter is not the trained model, so it cannot be merged"
        )


def check_adapter_base(adapter_dir: Path, model_name: str, base_dir: Path) -> None:
    """The adapter must have been trained on the recipe's model: same name, same resolved path, or same hub repo."""
    trained_on = adapter_config(adapter_dir).get("base_model_name_or_path")
    if not trained_on:
        print(f"note: {adapter_dir} does not record its base model; assuming {model_name}", flush=True)
        return
    if trained_on.rstrip("/") == model_name.rstrip("/"):
        return
    trained_path = Path(trained_on).expanduser()
    if trained_path.exists() and trained_path.resolve() == base_dir.resolve():
        return
    # A hub id on one side and a path into the hub cache (models--org--name/snapshots/...) on the other.
    for hub_id, path in ((model_name, trained_on), (trained_on, str(base_dir))):
        if looks_like_hub_id(hub_id) and f"models--{hub_id.replace('/', '--')}" in path:
            return
    raise UserError(
        f"adapter {adapter_dir} was trained on '{trained_on}', but the recipe's model is '{model_name}' "
        f"({base_dir}); merge it into its own base: fix model.name in the run's recipe.yaml or pass another adapter"
    )


def read_adapter(adapter_dir: Path) -> Adapter:
    config = adapter_config(adapter_dir)
    check_supported(adapter_dir, config)
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise UserError(f"{adapter_dir} has no adapter_model.safetensors; save the adapter with safetensors")
    from safetensors.torch import load_file

    state = load_file(weights)
    pairs: dict[str, LoraPair] = defaultdict(LoraPair)
    full: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        name = key.removeprefix(PEFT_PREFIX)
        if match := LORA_KEY.fullmatch(name):
            pair = pairs[match["module"]]
            if match["param"] == "bias":
                pair.b_bias = tensor
            else:
                setattr(pair, match["part"][-1].lower(), tensor)
        elif match := EMBEDDING_KEY.fullmatch(name):
            pair = pairs[match["module"]]
            pair.embedding = True
            setattr(pair, match["part"].lower(), tensor)
        elif "lora_" in name:
            raise UserError(f"{adapter_dir}: tensor {key} is not a LoRA A/B matrix; rlhf merge cannot merge it")
        else:
            full[name.replace(".base_layer.", ".")] = tensor
    for module, pair in pairs.items():
        if pair.a is None or pair.b is None or pair.a.shape[0] != pair.b.shape[1]:
            raise UserError(f"{adapter_dir}: layer {module} lacks a matching lora_A/lora_B pair; the adapter is broken")
    return Adapter(adapter_dir, config, dict(pairs), full, sum(t.numel() * t.element_size() for t in state.values()))


def lora_scaling(config: dict[str, Any], module: str, rank: int) -> float:
    """alpha / r, or alpha / sqrt(r) with rsLoRA; alpha_pattern keys match the end of the module name, as in peft."""
    alpha = config["lora_alpha"]
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = value
            break
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


@dataclass
class Target:
    module: str  # peft's name for the layer
    key: str  # the checkpoint's name for its weight
    bias_key: str | None  # ... and for its bias, when the adapter has lora_B biases (lora_bias=True)
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    lora_b_bias: torch.Tensor | None
    scaling: float
    transposed: bool  # the weight is stored (in, out): Conv1D with fan_in_fan_out, or an embedding

    @property
    def rank(self) -> int:
        return self.lora_a.shape[0]


@dataclass
class MergePlan:
    targets: dict[str, Target]  # checkpoint weight key -> its LoRA
    bias_targets: dict[str, Target]  # checkpoint bias key -> its LoRA
    replacements: dict[str, torch.Tensor]  # checkpoint key -> tensor saved in the adapter


def plan_merge(entries: list[TensorEntry], adapter: Adapter, config: dict[str, Any]) -> MergePlan:
    """Find the base tensor for every adapter tensor; any adapter tensor without one is an error."""
    keys = KeyMap([e.name for e in entries], config)
    shapes = {e.name: e.shape for e in entries}
    fan_in_fan_out = bool(adapter.config.get("fan_in_fan_out"))
    plan = MergePlan({}, {}, {})
    missing = []
    for module, pair in adapter.pairs.items():
        key = keys.find(f"{module}.weight")
        if key is None:
            missing.append(f"{module}.weight")
            continue
        transposed = fan_in_fan_out or pair.embedding
        expected = (pair.a.shape[1], pair.b.shape[0]) if transposed else (pair.b.shape[0], pair.a.shape[1])
        if shapes[key] != expected:
            raise UserError(
                f"adapter layer {module} makes a {expected} update but the base tensor {key} is {shapes[key]}: "
                f"the adapter was trained on another model"
            )
        bias_key = None
        if pair.b_bias is not None:
            bias_key = keys.find(f"{module}.bias")
            if bias_key is None:
                missing.append(f"{module}.bias")
                continue
        scaling = lora_scaling(adapter.config, module, pair.a.shape[0])
        target = Target(module, key, bias_key, pair.a, pair.b, pair.b_bias, scaling, transposed)
        plan.targets[key] = target
        if bias_key is not None:
            plan.bias_targets[bias_key] = target
    for name, tensor in adapter.full.items():
        key = keys.find(name)
        if key is None:
            missing.append(name)
        elif shapes[key] != tuple(tensor.shape):
            raise UserError(f"adapter tensor {name} is {tuple(tensor.shape)} but base tensor {key} is {shapes[key]}")
        else:
            plan.replacements[key] = tensor
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise UserError(
            f"adapter {adapter.dir} has tensors for {shown}, which the base checkpoint does not have: "
            f"the adapter was trained on another model"
        )
    return plan


class KeyMap:
    """Finds the checkpoint tensor for a name as peft saw it during training.

    Names may differ by a prefix (a checkpoint saved from the bare model has `layers.0...`, peft saw
    `gpt_neox.layers.0...`, or the other way round) and by transformers' load-time renames (GPT-NeoX's checkpoint
    `embed_out` is the model's `lm_head`), so a name matches exactly, or else by a unique dotted suffix.
    """

    def __init__(self, checkpoint_keys: list[str], config: dict[str, Any]):
        renames = _checkpoint_renames(config)
        self.to_checkpoint: dict[str, str] = {key: key for key in checkpoint_keys}
        for key in checkpoint_keys:
            renamed = key
            for rename in renames:
                renamed, _ = rename.rename_source_key(renamed)
            self.to_checkpoint.setdefault(renamed, key)
        self.by_tail: dict[str, list[str]] = defaultdict(list)
        for name in self.to_checkpoint:
            self.by_tail[self._tail(name)].append(name)

    @staticmethod
    def _tail(name: str) -> str:
        return ".".join(name.split(".")[-2:])

    def find(self, name: str) -> str | None:
        if name in self.to_checkpoint:
            return self.to_checkpoint[name]
        hits = {
            self.to_checkpoint[candidate]
            for candidate in self.by_tail[self._tail(name)]
            if candidate.endswith("." + name) or name.endswith("." + candidate)
        }
        if len(hits) > 1:
            raise UserError(f"adapter tensor {name} matches several base tensors ({', '.join(sorted(hits))})")
        return hits.pop() if hits else None


def _checkpoint_renames(config: dict[str, Any]) -> list:
    """transformers' own checkpoint -> model key renames for this architecture (plain renames only)."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import WeightRenaming

    found = None
    for name in [*(config.get("architectures") or []), config.get("model_type")]:
        if name and (found := get_checkpoint_conversion_mapping(name)) is not None:
            break
    return [t for t in found or [] if type(t) is WeightRenaming]
