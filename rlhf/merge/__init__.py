"""`rlhf merge`: add the SFT LoRA into the original base weights, one tensor at a time, and prove every merge.

peft's `merge_and_unload` needs the whole model in RAM (41 GB at fp16 for gpt-neox-20b). Here the base checkpoint is
read tensor by tensor from its safetensors files and written tensor by tensor into new shards whose headers are
planned up front, so the peak is about the largest tensor's working set plus the adapter — not the model, not a shard:

    LoRA target:    W' = W + scaling * B @ A     (in fp32, cast to the output dtype)
    anything else:  W' = W                       (floating tensors cast to the output dtype)

Every merged tensor is checked in-stream against peft's own `get_delta_weight` for that layer — a peft LoRA layer built
around a zero-cost stand-in for the base Linear — so a wrong scaling, transpose or key mapping is caught by code that
is not ours. A model small enough for RAM also gets a logit probe: merged model against the fp32 base + adapter.

step.py      the command: arguments, "already merged", the stream loop and W + scaling * B @ A (`run`,
             `merge_checkpoint`)
io.py        safetensors read one tensor at a time, shards planned and written, the merged dir's other files
adapters.py  the adapter: what can be merged, its A/B pairs and scaling, the base tensor each one belongs to
verify.py    the checks: each tensor against peft's delta, the logit probe
combine.py   several adapters combined by peft (--adapters ... --weights ...)
ram.py       the RAM and disk a merge needs (`rlhf budget` plans a merge with the same formula)
card.py      the merged model's README.md
"""

import importlib

# Each name loads its module on first use: `rlhf budget` plans a merge with ram.py's formula, and importing step.py,
# io.py and the rest would import torch for it (seconds, for a command that should answer at once).
_EXPORTS = {
    "KeyMap": "adapters",
    "MergeCheckFailed": "verify",
    "MergeResult": "step",
    "combine_adapters": "combine",
    "max_shard_bytes": "io",
    "merge_checkpoint": "step",
    "run": "step",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'rlhf.merge' has no attribute '{name}'")
    return getattr(importlib.import_module(f"rlhf.merge.{_EXPORTS[name]}"), name)
