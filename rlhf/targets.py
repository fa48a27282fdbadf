"""Which linear layers LoRA adapts: `lora.target_modules` resolved against the names of a model's linear layers.

Names in, names out, no model: training resolves against the loaded model (`rlhf.modeling.resolve_targets`), and the
memory budget can resolve the same targets from a config's shapes before anything is loaded.

    auto        the family's default below; any other family gets every linear layer
    all-linear  every linear layer but the output head (peft's shorthand of that name)
    [a, b, ...] these short names, each of which must be a linear layer of the model
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from rlhf.errors import UserError

AUTO = "auto"
ALL_LINEAR = "all-linear"

# GPT-NeoX keeps the reference recipe's one fused attention projection (the trl-peft gpt-neox-20b recipe, and what the
# quickstart was tuned with). Every other family gets all its linear layers (Llama, Mistral, Qwen2, Gemma, Gemma2:
# q/k/v/o_proj, gate/up/down_proj; Phi-3: qkv_proj, o_proj, gate_up_proj, down_proj): QLoRA found that adapting every
# linear layer is what matches full fine-tuning, and it works on a family rlhf has never seen.
FAMILY_DEFAULTS: dict[str, tuple[str, ...]] = {"gpt_neox": ("query_key_value",)}


def resolve_targets(requested: str | Sequence[str], model_type: str, linear_names: Iterable[str]) -> list[str]:
    """The sorted short names of the layers LoRA adapts.

    requested: `lora.target_modules` ("auto", "all-linear" or a list of short names); model_type: config.json's
    `model_type`; linear_names: short names of the model's linear layers, the output head left out.
    """
    available = sorted(set(linear_names))
    if not available:
        raise UserError(
            f"this {model_type} model has no linear layers LoRA can adapt (nn.Linear); rlhf cannot train it with LoRA"
        )
    if requested == AUTO:
        requested = FAMILY_DEFAULTS.get(model_type, ALL_LINEAR)
    if requested == ALL_LINEAR:
        return available
    missing = [name for name in requested if name not in available]
    if missing:
        raise UserError(
            f"lora.target_modules {missing} are not layers of this model; its linear layers are: {', '.join(available)}"
        )
    return sorted(set(requested))
