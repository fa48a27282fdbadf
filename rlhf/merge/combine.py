"""Several LoRA adapters combined into one by peft (linear, cat, ties, dare_ties), before the merge."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from rlhf.errors import UserError
from rlhf.merge.adapters import read_adapter
from rlhf.merge.verify import peft_skeleton

METHODS = ("linear", "cat", "ties", "dare_ties")


def combine_adapters(
    adapter_dirs: list[Path], weights: list[float], method: str, out_dir: Path, density: float = 0.5
) -> Path:
    """Combine LoRA adapters with peft's add_weighted_adapter, on a skeleton (no base weights), and save the result.

    Returns the combined adapter's directory, ready for merge_checkpoint.
    """
    if len(adapter_dirs) != len(weights):
        raise UserError(f"{len(adapter_dirs)} adapters but {len(weights)} weights; give one weight per adapter")
    if method not in METHODS:
        raise UserError(f"method is '{method}'; use one of {', '.join(METHODS)}")
    names = [f"adapter{i}" for i in range(len(adapter_dirs))]
    model = peft_skeleton({name: read_adapter(Path(d)) for name, d in zip(names, adapter_dirs, strict=True)})
    torch.manual_seed(0)  # dare_ties drops entries at random: the same inputs give the same merge
    try:
        model.add_weighted_adapter(
            names,
            list(weights),
            "combined",
            combination_type=method,
            density=density if method in ("ties", "dare_ties") else None,
        )
    except ValueError as exc:
        hint = "; adapters of different ranks combine with --method cat" if "same r" in str(exc) else ""
        raise UserError(f"peft cannot combine the adapters with --method {method}: {exc}{hint}") from None
    model.save_pretrained(out_dir, selected_adapters=["combined"])
    combined = out_dir / "combined"
    config = json.loads((combined / "adapter_config.json").read_text())
    # peft folds each adapter's scaling into the combined A and B and sets lora_alpha = r, so the combined scaling
    # must be 1; it copies use_rslora from the first adapter, which would make it sqrt(r).
    config["use_rslora"] = False
    (combined / "adapter_config.json").write_text(json.dumps(config, indent=2))
    print(f"combined {len(adapter_dirs)} adapters with peft ({method}, weights {list(weights)})", flush=True)
    return combined
