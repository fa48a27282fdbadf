"""`merge.base_weights=dequantized`: the base weights as a 4-bit training run saw them.

An adapter trained on an NF4 base learned against dequant(quant(W)), not W. Merging into the dequantized weights
writes the model that was trained; merging into the originals writes a slightly different one (docs/memory.md has
both differences, measured). The rounding here is bitsandbytes' own (`quantize_4bit`/`dequantize_4bit` with the
settings rlhf loads with: NF4, blocks of 64, double-quantized absmax), one tensor at a time like the rest of the merge.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from rlhf.errors import UserError
from rlhf.merge.io import TensorEntry

BLOCKSIZE = 64  # bitsandbytes' Params4bit default, which transformers' 4-bit loading keeps


def quantized_weight_names(base_dir: Path, entries: list[TensorEntry], trust_remote_code: bool = False) -> set[str]:
    """The checkpoint tensors that a 4-bit load quantizes: every Linear weight but those transformers keeps
    (the output embedding, tied weights, the last module), read from the model built on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.quantizers.base import get_keys_to_not_convert

    config = AutoConfig.from_pretrained(base_dir, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    kept = get_keys_to_not_convert(model)
    names = {
        f"{name}.weight"
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not any(name == k or name.endswith(f".{k}") for k in kept)
    }
    found = names & {e.name for e in entries}
    if len(found) != len(names):
        missing = sorted(names - found)[0]
        raise UserError(
            f"{base_dir}: the checkpoint names its tensors differently from the model ({missing} not found), so "
            f"merge.base_weights=dequantized cannot tell which were quantized; use merge.base_weights=original"
        )
    return found


def nf4_round_trip(weight: torch.Tensor, load_dtype: torch.dtype) -> torch.Tensor:
    """dequant(quant(W)) in fp32, W first cast to the dtype the training run loaded the model in."""
    import bitsandbytes.functional as F

    packed, state = F.quantize_4bit(
        weight.to(load_dtype).contiguous(), blocksize=BLOCKSIZE, compress_statistics=True, quant_type="nf4"
    )
    return F.dequantize_4bit(packed, state).to(torch.float32)
