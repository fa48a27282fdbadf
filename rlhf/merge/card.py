"""The merged model's README.md: what was merged into what, how, and the checks' numbers."""

from __future__ import annotations

from typing import Any


def model_card(record: dict[str, Any], adapter_config: dict[str, Any], tolerance: float) -> str:
    base = record.get("base_model") or record["base_dir"]
    adapters = ", ".join(f"`{a}`" for a in record["adapters"])
    if record.get("weights"):
        adapters += f" combined by peft ({record['method']}, weights {record['weights']})"
    revision = f" @ {record['revision']}" if record.get("revision") else ""
    targets = adapter_config.get("target_modules")
    targets = ", ".join(sorted(targets)) if isinstance(targets, list) else targets
    logits = record["max_abs_diff_logits"]
    logits = f"{logits:.3g} (tolerance {tolerance:g})" if logits is not None else "not run (model too large for RAM)"
    rows = [
        ("Base model", f"`{base}`{revision}, read from `{record['base_dir']}` at its original precision"),
        (
            "Adapter",
            f"{adapters} (LoRA r={adapter_config.get('r')}, alpha={adapter_config.get('lora_alpha')}, "
            f"targets {targets})",
        ),
        ("Recipe", f"`{record['recipe']}`" if record.get("recipe") else "none (merged with merge_checkpoint)"),
        ("Data", record.get("data") or "not recorded"),
        ("Merged on", record["date"]),
        ("dtype", record["dtype"]),
        (
            "Check: weights",
            f"max abs(merged - (base + peft delta)) = {record['max_abs_diff_weights']:.3g}, "
            f"every element within one {record['dtype']} rounding step",
        ),
        ("Check: logits", f"max abs(merged - ({_reference(record)})) = {logits}"),
    ]
    if record.get("base_weights") == "dequantized":
        rows.insert(1, ("Base weights", "rounded through NF4 as the 4-bit training run saw them (merge.base_weights)"))
    elif record.get("max_abs_diff_logits_vs_trained") is not None:
        rows.append(
            (
                "4-bit training",
                f"max abs(merged - (4-bit base + adapter, as trained)) = "
                f"{record['max_abs_diff_logits_vs_trained']:.3g}; merge.base_weights=dequantized merges into the "
                f"weights the adapter was trained on",
            )
        )
    lines = [
        "---",
        f"base_model: {base}",
        "library_name: transformers",
        "tags: [rlhf, lora, merged]",
        "---",
        "",
        f"# {base} + LoRA, merged",
        "",
        f"The LoRA adapter added into the weights of `{base}` by `rlhf merge` (W + scaling * B A, computed in fp32, "
        f"streamed one tensor at a time) and saved at {record['dtype']}. Load it like any model:",
        "`AutoModelForCausalLM.from_pretrained(path)`.",
        "",
        "| | |",
        "|---|---|",
        *(f"| {key} | {value} |" for key, value in rows),
    ]
    if record.get("recipe_yaml"):
        lines += ["", "## Recipe", "", "```yaml", record["recipe_yaml"].rstrip(), "```"]
    return "\n".join(lines) + "\n"


def _reference(record: dict[str, Any]) -> str:
    return "4-bit base + adapter, as trained" if record.get("base_weights") == "dequantized" else "fp32 base + adapter"
