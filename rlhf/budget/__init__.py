"""The memory budget: what each step holds at its peak, component by component, before anything heavy is loaded.

A 24 GB user's worst hour is a job that dies of OOM after twenty minutes of loading. So every step first predicts its
peak from shapes alone (config.json, a model instantiated on the meta device: exact parameter counts, no weights),
refuses what will not fit, and says the cheapest change that would.

What is counted follows what rlhf's code does, not a generic rule of thumb. Where each part lives:

device.py    the memory to plan against: --gpu NAME|SIZE, the recipe's budget.gpu, this GPU, or free RAM
shapes.py    a model's shape from its config.json, on the meta device
formulas.py  the bytes of each kind of tensor: quantized weights, LoRA, optimizer states, activations, logits chunks,
             the KV cache, the reward model (the docstring there says what is counted, tensor by tensor)
moments.py   each step's moments and what each holds: sft, reward, ppo (generation, scoring, reward, update), merge
peak.py      the overhead, the peak moment, the device: `estimate()` and `Estimate`
fit.py       what would make it fit: ranked changes (`suggest`), the largest micro-batch that fits (`auto_fit`)
report.py    the table and verdict, `rlhf budget` (`main`), the pre-flight every step runs (`preflight`)

A step's components sum exactly to its total.
"""

from rlhf.budget.device import GPUS, Device, gpu_bytes, resolve_device
from rlhf.budget.fit import Change, Suggestion, apply_changes, auto_fit, suggest
from rlhf.budget.formulas import (
    TrainSetup,
    layer_saved_per_token,
    nf4_bytes,
    optimizer_bytes,
    train_activations,
    weight_bytes,
)
from rlhf.budget.moments import checkpoint_reentrant
from rlhf.budget.peak import COMPONENTS, Estimate, estimate, load_reward_spec
from rlhf.budget.report import main, preflight, render_table
from rlhf.budget.shapes import ModelShape, model_shape, shipped_config

# What the commands (cli, sft, ppo) and the tests use; anything else is imported from its module.
__all__ = [
    "COMPONENTS",
    "GPUS",
    "Change",
    "Device",
    "Estimate",
    "ModelShape",
    "Suggestion",
    "TrainSetup",
    "apply_changes",
    "auto_fit",
    "checkpoint_reentrant",
    "estimate",
    "gpu_bytes",
    "layer_saved_per_token",
    "load_reward_spec",
    "main",
    "model_shape",
    "nf4_bytes",
    "optimizer_bytes",
    "preflight",
    "render_table",
    "resolve_device",
    "shipped_config",
    "suggest",
    "train_activations",
    "weight_bytes",
]
