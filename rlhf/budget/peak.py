"""A step's predicted peak: its moments (moments.py) with the overhead added, the largest of them, and the device it
is planned against. `Estimate` is what the report, the suggestions and the pre-flight read."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf.budget.device import CUDA_CONTEXT, ram_device, resolve_device
from rlhf.budget.lengths import DataLengths
from rlhf.budget.moments import (
    dpo_moments,
    grpo_moments,
    lora_targets,
    merge_ram,
    ppo_moments,
    reward_moments,
    sft_moments,
)
from rlhf.budget.shapes import ModelShape, model_shape
from rlhf.config import Recipe
from rlhf.errors import UserError
from rlhf.units import format_bytes

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
STEPS = ("sft", "merge", "reward", "ppo", "grpo", "dpo")
FRAGMENTATION = 0.10  # of the bytes allocated and freed during a step (activations, logits, KV cache, gradients)
ASSUMED_REWARD_MODEL = "lvwerra/distilbert-imdb"  # sized, with a spec's defaults, when the spec cannot be read


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
    lengths: DataLengths | None = field(default=None, repr=False, compare=False)  # what the sizes came from

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
    classifier with a spec's defaults when the spec cannot be found or read (the step itself reports that error).

    A reward model of `rlhf reward` (RUN/reward) is {"adapter": {rank, targets, path}}, from its adapter's config; a
    RUN/reward that does not exist yet is {"adapter": {}}, planned from the recipe (`with_recipe`)."""
    from rlhf.rewards import RewardSpec, load_spec
    from rlhf.rl.reward_files import reward_adapter_dir

    adapter = reward_adapter_dir(name)
    if adapter is not None:
        config = json.loads((adapter / "adapter_config.json").read_text())
        return {"adapter": {"rank": config["r"], "targets": sorted(config["target_modules"]), "path": str(adapter)}}
    if Path(name).name == "reward" and not Path(name).exists():
        return {"adapter": {}}
    try:
        spec, assumed = load_spec(name), {}
    except UserError:
        spec, assumed = RewardSpec(name=name, model=ASSUMED_REWARD_MODEL), {"assumed": True}
    if spec.type != "text-classification":
        return {"model": None, "batch_size": 0, "device": "cpu", "max_length": 0, "callable": True}
    fields = {"model": spec.model, "batch_size": spec.batch_size, "device": spec.device, "max_length": spec.max_length}
    return fields | assumed


def with_recipe(spec: dict[str, Any], recipe: Recipe, shape: ModelShape) -> dict[str, Any]:
    """The reward spec with what the recipe adds: a planned reward adapter's LoRA (reward_model.lora, as `rlhf reward`
    would train it) and the judge's classifier (reward.judge)."""
    spec = dict(spec)
    if "adapter" in spec and not spec["adapter"]:
        lora = recipe.reward_model.lora
        spec["adapter"] = {"rank": lora.rank, "targets": lora_targets(shape, lora)}
    if recipe.reward.judge and "judge" not in spec:
        spec["judge"] = load_reward_spec(recipe.reward.judge)
    if recipe.reward.device is not None:  # the recipe's reward.device overrides the specs'
        for part in (spec, spec.get("judge")):
            if part and part.get("model"):
                part["device"] = recipe.reward.device
    return spec


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


def estimate(
    recipe: Recipe,
    step: str,
    device_bytes: int | None = None,
    reward_spec: dict | None = None,
    *,
    device_kind: str | None = None,
    device_description: str = "",
    disk_path: Path | str | None = None,
    lengths: DataLengths | None = None,
) -> Estimate:
    """The predicted peak memory of `step` (sft | merge | reward | ppo | grpo | dpo) for `recipe`, against
    `device_bytes`.

    `device_bytes` None: the device `resolve_device` picks (merge: free RAM). `device_kind`: "cuda" plans for a GPU
    (CUDA context counted; the reward model counts only if its spec puts it on the GPU), "cpu" for a CPU run;
    default "cuda" when `device_bytes` is given. `disk_path`: where merge writes (its free space is checked).
    `lengths`: sequence lengths measured on the data (`budget.lengths`), where the recipe's limits would overstate.
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
        parts, disk, settings = merge_ram(recipe, shape)
        peak = "merge (largest tensor)"
        moments = {peak: {name: parts.get(name, 0) for name in COMPONENTS}}
        if disk_path is not None:
            existing = next(p for p in [Path(disk_path), *Path(disk_path).resolve().parents] if p.exists())
            disk_free = shutil.disk_usage(existing).free
    else:
        if step == "sft":
            raw, settings, notes = sft_moments(recipe, shape, device_kind, lengths)
            static = ("weights", "lora", "optimizer")
        elif step == "reward":
            raw, settings, notes = reward_moments(recipe, shape, device_kind)
            static = ("weights", "lora", "optimizer")
        elif step == "dpo":
            raw, settings, notes = dpo_moments(recipe, shape, device_kind)
            static = ("weights", "lora", "optimizer")
        else:
            spec = reward_spec if reward_spec is not None else load_reward_spec(recipe.reward.name)
            spec = reward_spec = with_recipe(spec, recipe, shape)
            moments_of = grpo_moments if step == "grpo" else ppo_moments
            raw, settings, notes = moments_of(recipe, shape, device_kind, spec, lengths)
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
        lengths=lengths,
    )
