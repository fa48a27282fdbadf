"""Which shipped models fit a card, and the largest one per step: the budget over every model whose shape ships with
rlhf (`rlhf budget --list --gpu 24GiB --step grpo`, the README's fit tables). Shapes only: no GPU, no hub.

A model is taken at its shipped recipe's settings where one exists (gpt-neox-20b, llama-3.1-8b, ...), else at the
default recipe with its hub id; when it does not fit as it is, the budget's first suggestion that makes it fit
(`fit.suggest`, cheapest change first: slower settings before a weaker base) is the setting it fits at.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from rlhf.budget.fit import suggest
from rlhf.budget.peak import estimate
from rlhf.budget.shapes import model_shape, shipped_configs_dir
from rlhf.config import Recipe, load_recipe

RECIPES = ("gpt-neox-20b", "llama-3.1-8b", "qwen2.5-14b", "qwen2.5-32b")  # shipped recipes tuned for one card
STEPS = ("sft", "reward", "ppo", "grpo", "dpo")  # the training steps (merge runs in RAM, not on the card)


@dataclass(frozen=True)
class ModelFit:
    label: str  # "`gpt-neox-20b` recipe" or "ORG/NAME (defaults)"
    model: str  # the hub id
    params: int
    step: str
    total_bytes: int  # at the recipe's own settings
    fits: bool  # as it is
    settings: str | None  # "" as it is; the KEY=VALUE changes it fits with; None: nothing the budget knows fits it
    fitted_bytes: int | None  # the peak at `settings`


def shipped_recipes() -> list[tuple[str, Recipe]]:
    """(label, recipe): the shipped recipes, then every other shipped causal LM at the default settings."""
    recipes = [(f"`{name}` recipe", load_recipe(name)) for name in RECIPES]
    named = {recipe.model.name.lower() for _, recipe in recipes}
    others = []
    for config in sorted(shipped_configs_dir().glob("*/*/config.json"), key=lambda p: str(p).lower()):
        hub_id = str(config.parent.relative_to(shipped_configs_dir()))
        architectures = json.loads(config.read_text()).get("architectures", [])
        if hub_id.lower() not in named and any(a.endswith("ForCausalLM") for a in architectures):
            others.append((f"{hub_id} (defaults)", load_recipe(None, [f"model.name='{hub_id}'"])))
    return recipes + others


def model_fit(label: str, recipe: Recipe, step: str, device_bytes: int, description: str = "") -> ModelFit:
    est = estimate(recipe, step, device_bytes, device_kind="cuda", device_description=description)
    settings, fitted = ("", est.total_bytes) if est.fits else (None, None)
    if not est.fits:
        first = next((s for s in suggest(est) if s.fits), None)
        if first is not None:
            settings, fitted = first.text, first.total_bytes
    params = model_shape(recipe.model.name).params
    return ModelFit(label, recipe.model.name, params, step, est.total_bytes, est.fits, settings, fitted)


def fits_on(step: str, device_bytes: int, description: str = "") -> list[ModelFit]:
    """Every shipped model for `step` on a card of `device_bytes`, largest first."""
    rows = [model_fit(label, recipe, step, device_bytes, description) for label, recipe in shipped_recipes()]
    return sorted(rows, key=lambda r: (-r.params, r.label))


def largest(rows: list[ModelFit]) -> ModelFit | None:
    """The model with the most parameters that fits, as it is or with settings (a recipe before a bare model id)."""
    fitting = [r for r in rows if r.settings is not None]
    return max(fitting, key=lambda r: (r.params, r.label.startswith("`")), default=None)


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def render(step: str, rows: list[ModelFit], description: str) -> str:
    lines = [f"{step} on {description}: the shipped models, largest first (rlhf budget --model ID --step {step})"]
    for r in rows:
        if r.fits:
            verdict = f"fits as it is ({_gib(r.total_bytes)})"
        elif r.settings is not None:
            verdict = f"fits with {r.settings} ({_gib(r.total_bytes)} -> {_gib(r.fitted_bytes)})"
        else:
            verdict = f"does not fit ({_gib(r.total_bytes)}; no change the budget knows makes it fit)"
        lines.append(f"  {r.label:<40} {r.params / 1e9:6.2f} B  {verdict}")
    best = largest(rows)
    lines.append(f"largest that fits: {best.label if best else 'none'}")
    return "\n".join(lines)


def main(gpu: str, step: str, as_json: bool = False) -> int:
    """`rlhf budget --list --gpu SIZE [--step STEP]`: which shipped models fit, and how; exit 0."""
    from rlhf.budget.device import gpu_bytes

    device_bytes = gpu_bytes(gpu)
    steps = STEPS if step == "all" else (step,)
    if "merge" in steps:
        from rlhf.errors import UserError

        raise UserError("rlhf budget --list --gpu plans the training steps on a card; merge runs in RAM: pick --step")
    result = {s: fits_on(s, device_bytes, gpu) for s in steps}
    if as_json:
        from dataclasses import asdict

        print(json.dumps([{**asdict(r), "largest": r == largest(rows)} for rows in result.values() for r in rows]))
    else:
        print("\n\n".join(render(s, rows, gpu) for s, rows in result.items()))
    return 0
