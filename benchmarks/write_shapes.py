"""Rewrite rlhf/model_configs/ORG/NAME/shape.json from each config.json beside it: the shapes `rlhf budget` reads
without importing torch or transformers. Run after adding or changing a shipped config (or when
tests/test_shapes.py says one is stale):

    python benchmarks/write_shapes.py
"""

from __future__ import annotations

from rlhf.budget.shapes import shipped_configs_dir, shipped_shape_text
from rlhf.io import atomic_write_text


def main() -> None:
    for config in sorted(shipped_configs_dir().glob("*/*/config.json")):
        atomic_write_text(config.with_name("shape.json"), shipped_shape_text(config))
        print(config.with_name("shape.json").relative_to(shipped_configs_dir()))


if __name__ == "__main__":
    main()
