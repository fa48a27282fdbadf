"""The README's "Models and cards" table: for each shipped recipe (and each other shipped model shape at the default
settings) and each common card size, does `rlhf sft` / `rlhf ppo` fit, and if not, the budget's first suggestion.

    python benchmarks/fit_table.py            # print the table
    python benchmarks/fit_table.py --write    # and put it into README.md, between the fit-table markers

Everything comes from the memory budget (`rlhf budget`): shapes only, no GPU, no hub, a second or two.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rlhf.budget import estimate, gpu_bytes, suggest
from rlhf.budget.shapes import model_shape, shipped_configs_dir
from rlhf.config import Recipe, load_recipe
from rlhf.units import GiB

RECIPES = ("gpt-neox-20b", "llama-3.1-8b", "qwen2.5-14b")
CARDS = ("12GiB", "16GiB", "24GiB")
STEPS = ("sft", "ppo")
SMALL = 1.5e9  # parameters: models below this fit every card listed, so they would only lengthen the table
README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN, END = "<!-- fit-table: python benchmarks/fit_table.py --write -->", "<!-- /fit-table -->"


def rows() -> list[tuple[str, Recipe]]:
    """(label, recipe): the shipped recipes, then every other shipped causal LM with the default settings."""
    recipes = [(f"`{name}` recipe", load_recipe(name)) for name in RECIPES]
    named = {recipe.model.name.lower() for _, recipe in recipes}
    others = []
    for config in sorted(shipped_configs_dir().glob("*/*/config.json"), key=lambda p: str(p).lower()):
        hub_id = str(config.parent.relative_to(shipped_configs_dir()))
        architectures = json.loads(config.read_text()).get("architectures", [])
        if hub_id.lower() in named or not any(a.endswith("ForCausalLM") for a in architectures):
            continue
        if model_shape(hub_id).params >= SMALL:
            others.append((f"{hub_id} (defaults)", load_recipe(None, [f"model.name='{hub_id}'"])))
    return recipes + others


def cell(recipe: Recipe, step: str, card: str) -> str:
    est = estimate(recipe, step, gpu_bytes(card), device_kind="cuda", device_description=card)
    if est.fits:
        return f"fits ({est.total_bytes / GiB:.1f})"
    ranked = suggest(est)
    if not ranked:
        return f"no ({est.total_bytes / GiB:.1f}), nothing shrinks it"
    first = ranked[0]
    verdict = "" if first.fits else ", still over"
    return f"no ({est.total_bytes / GiB:.1f}): `{first.text}` → {first.total_bytes / GiB:.1f}{verdict}"


def table() -> str:
    head = ["Model and settings", "Step", *(card.replace("GiB", " GiB") for card in CARDS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, recipe in rows():
        for step in STEPS:
            lines.append("| " + " | ".join([label, step, *(cell(recipe, step, card) for card in CARDS)]) + " |")
    return "\n".join(lines)


def write_readme(text: str) -> None:
    readme = README.read_text()
    start, end = readme.index(BEGIN) + len(BEGIN), readme.index(END)
    README.write_text(readme[:start] + "\n" + text + "\n" + readme[end:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="replace the table in README.md")
    args = parser.parse_args()
    text = table()
    print(text)
    if args.write:
        write_readme(text)


if __name__ == "__main__":
    main()
