"""The README's "Models and cards" tables: for each shipped recipe (and each other shipped model shape at the default
settings) and each common card size, does `rlhf sft` / `rlhf ppo` fit, and if not, the budget's first suggestion; then,
for each card and each training step, the largest shipped model that fits and at which settings
(`rlhf.budget.catalog`, what `rlhf budget --list --gpu SIZE --step STEP` prints).

    python benchmarks/fit_table.py            # print the table
    python benchmarks/fit_table.py --write    # and put it into README.md, between the fit-table markers

Everything comes from the memory budget (`rlhf budget`): shapes only, no GPU, no hub, a second or two.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rlhf.budget import catalog, estimate, gpu_bytes, suggest
from rlhf.budget.shapes import model_shape
from rlhf.config import Recipe
from rlhf.units import GiB

CARDS = ("12GiB", "16GiB", "24GiB")
STEPS = ("sft", "ppo")
SMALL = 1.5e9  # parameters: models below this fit every card listed, so they would only lengthen the table
README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN, END = "<!-- fit-table: python benchmarks/fit_table.py --write -->", "<!-- /fit-table -->"


def rows() -> list[tuple[str, Recipe]]:
    """(label, recipe): the shipped recipes, then every other shipped causal LM of SMALL or more at the defaults."""
    return [
        (label, recipe)
        for label, recipe in catalog.shipped_recipes()
        if label.startswith("`") or model_shape(recipe.model.name).params >= SMALL
    ]


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


def largest_table() -> str:
    """Per training step and card: the largest shipped model that fits, and the settings it fits at."""
    head = ["Step", *(f"largest on {card.replace('GiB', ' GiB')}" for card in CARDS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for step in catalog.STEPS:
        cells = []
        for card in CARDS:
            best = catalog.largest(catalog.fits_on(step, gpu_bytes(card), card))
            if best is None:
                cells.append("none")
                continue
            how = "as it is" if best.fits else f"`{best.settings}`"
            cells.append(f"{best.label}, {best.params / 1e9:.1f} B: {how} ({best.fitted_bytes / GiB:.1f})")
        lines.append("| " + " | ".join([step, *cells]) + " |")
    return "\n".join(lines)


def text() -> str:
    """Both tables, as the README shows them between the fit-table markers."""
    return table() + "\n\n" + largest_table()


def write_readme(text: str) -> None:
    readme = README.read_text()
    start, end = readme.index(BEGIN) + len(BEGIN), readme.index(END)
    README.write_text(readme[:start] + "\n" + text + "\n" + readme[end:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="replace the table in README.md")
    args = parser.parse_args()
    tables = text()
    print(tables)
    if args.write:
        write_readme(tables)


if __name__ == "__main__":
    main()
