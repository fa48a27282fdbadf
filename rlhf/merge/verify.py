"""The merge's proofs: every merged tensor against peft's own delta for its layer (peft layers around zero-cost
stand-ins for the base weights), and, for a model small enough for RAM, the merged logits against base + adapter."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from rlhf.errors import UserError
from rlhf.merge.adapters import Adapter, LoraPair

PROBE_SHAPE = (2, 16)  # random token ids for the logit probe: batch, length


class MergeCheckFailed(Exception):
    """The merged weights or logits differ from base + adapter by more than allowed; nothing was written."""

    exit_code = 1


def check_rounding(name: str, out: torch.Tensor, ref: torch.Tensor, scratch: torch.Tensor, dtype, rank: int) -> float:
    """Every element of `out` must be within one `dtype` rounding step of peft's fp32 result `ref`.

    Rounding the fp32 result costs at most half a step; the slack covers fp32 noise (summation order in B @ A).
    A wrong scaling, a transposed delta or a delta added to the wrong layer is far outside this. `ref` and
    `scratch` (fp32, same shape) are overwritten in place: no full-size temporaries.
    """
    if not out.numel():
        return 0.0
    error = scratch.copy_(out).sub_(ref).abs_()
    max_error = float(error.max())
    lo, hi = ref.aminmax()
    finfo = torch.finfo(dtype)
    slack = finfo.eps * finfo.tiny + 8 * (rank + 1) * torch.finfo(torch.float32).eps * max(-float(lo), float(hi))
    excess = float(error.sub_(ref.abs_().mul_(finfo.eps).add_(slack)).max())  # max(error - allowed)
    if not excess <= 0:  # NaN fails too
        raise MergeCheckFailed(
            f"merged tensor {name} differs from the base plus peft's own delta by up to {max_error:.4g} "
            f"({excess:.3g} beyond one {str(dtype).removeprefix('torch.')} rounding step); the merge is wrong "
            f"and nothing was written"
        )
    return max_error


def _skeleton(pairs: dict[str, LoraPair], fan_in_fan_out: bool, biased: set[str]) -> nn.Module:
    """A module tree holding, at peft's names, stand-ins for the targeted layers: right shapes, no memory.

    The weights are one fp32 zero broadcast to full size; fp32 so that peft, which casts the adapter to the base
    layer's dtype, keeps the adapter's own precision.
    """
    from transformers.pytorch_utils import Conv1D

    def free(*shape: int) -> nn.Parameter:
        return nn.Parameter(torch.zeros((), dtype=torch.float32).expand(*shape), requires_grad=False)

    root = nn.Module()
    for module, pair in pairs.items():
        n_in, n_out = pair.a.shape[1], pair.b.shape[0]
        with torch.device("meta"):
            if pair.embedding:
                layer = nn.Embedding(n_in, n_out)
            elif fan_in_fan_out:
                layer = Conv1D(n_out, n_in)
            else:
                layer = nn.Linear(n_in, n_out)
        layer.weight = free(*layer.weight.shape)
        if hasattr(layer, "bias"):  # real zeros: peft may load a saved base bias into it
            layer.bias = nn.Parameter(torch.zeros(n_out), requires_grad=False) if module in biased else None
        parent = root
        *path, leaf = module.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, layer)
    return root


def _load_into(model, adapter_dir: Path, name: str) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    # LoRA tensors only: whole saved tensors (a base_layer.weight) would not fit the skeleton's zero-cost stand-ins.
    state = {k: v for k, v in load_file(adapter_dir / "adapter_model.safetensors").items() if "lora_" in k}
    result = set_peft_model_state_dict(model, state, adapter_name=name)
    missing = [k for k in result.missing_keys if "lora_" in k and f".{name}." in k]
    if missing:
        raise UserError(f"peft could not load {adapter_dir} ({missing[0]} missing); the adapter is broken")


def _peft_config(adapter_dir: Path):
    """The adapter's config for loading into a skeleton: no initialisation (the weights are loaded next)."""
    from peft import LoraConfig

    config = LoraConfig.from_pretrained(adapter_dir)
    config.init_lora_weights = False
    config.modules_to_save = None  # whole tensors are merged by plan_merge, not by the skeleton
    config.inference_mode = True
    return config


def peft_skeleton(adapters: dict[str, Adapter]):
    """A PeftModel over a skeleton, with each adapter loaded by peft itself under its given name."""
    from peft import PeftModel

    pairs: dict[str, LoraPair] = {}
    for adapter in adapters.values():
        for module, pair in adapter.pairs.items():
            known = pairs.setdefault(module, pair)
            if (known.a.shape[1], known.b.shape[0]) != (pair.a.shape[1], pair.b.shape[0]):
                raise UserError(f"the adapters disagree on the shape of layer {module}: they are for different models")
    fan_in_fan_out = {bool(a.config.get("fan_in_fan_out")) for a in adapters.values()}
    if len(fan_in_fan_out) > 1:
        raise UserError("the adapters disagree on fan_in_fan_out: they are for different models")
    biased = {m for a in adapters.values() for m, p in a.pairs.items() if p.b_bias is not None}
    root = _skeleton(pairs, fan_in_fan_out.pop(), biased)
    model = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns about a model without a config: the skeleton has none
        for name, adapter in adapters.items():
            if model is None:
                model = PeftModel(root, _peft_config(adapter.dir), adapter_name=name)
            else:
                model.add_adapter(name, _peft_config(adapter.dir))
            _load_into(model, adapter.dir, name)
    return model


class PeftReference:
    """peft's delta for each layer of one adapter: the in-stream check's reference, independent of our arithmetic."""

    def __init__(self, adapter: Adapter):
        self.model = peft_skeleton({"default": adapter})

    def _layer(self, module: str):
        from peft.tuners.lora import LoraLayer

        layer = self.model.base_model.model.get_submodule(module)
        if not isinstance(layer, LoraLayer):
            raise UserError(f"peft does not put a LoRA layer at {module} for this adapter's target_modules")
        return layer

    @torch.no_grad()
    def delta(self, module: str) -> torch.Tensor:
        """The fp32 update peft adds to the layer's weight (a fresh tensor: the caller may overwrite it)."""
        return self._layer(module).get_delta_weight("default").to(torch.float32)

    @torch.no_grad()
    def bias_delta(self, module: str) -> torch.Tensor:
        layer = self._layer(module)
        return (layer.lora_B["default"].bias * layer.scaling["default"]).to(torch.float32)


@torch.no_grad()
def probe_logits(
    base_dir: Path,
    adapter_dir: Path,
    merged_dir: Path,
    trust_remote_code: bool = False,
    trained=None,
    dtype: torch.dtype = torch.float16,
) -> dict[str, float]:
    """max |logits(merged) - logits(reference)| on random token ids, run in fp32, for each reference: "original", the
    base + adapter by peft; with `trained` (a 4-bit run's ModelConfig) also "trained", the NF4 base as that run loaded
    it + adapter. Also checks strict loading. The original base is taken as the merge's output `dtype` stores it: an
    fp32 base merged to bf16 loses bf16's rounding in every tensor (0.053 on the fixture's logits), no merge error.

    One model in memory at a time: the references' logits are kept, each reference freed, then the merged is loaded.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    def load(path: Path, stored: torch.dtype = torch.float32):
        with _no_progress_bars():
            model, info = AutoModelForCausalLM.from_pretrained(
                path, dtype=stored, output_loading_info=True, trust_remote_code=trust_remote_code
            )
        return model.float(), info

    base, base_info = load(base_dir, dtype)
    vocab = base.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, PROBE_SHAPE, generator=torch.Generator().manual_seed(0))

    def with_adapter(model):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # peft calls a transformers API deprecated for v6
            return PeftModel.from_pretrained(model, adapter_dir).eval()(input_ids=ids).logits.float()

    expected = {"original": with_adapter(base)}
    del base
    if trained is not None:
        from rlhf import modeling

        with _no_progress_bars():
            expected["trained"] = with_adapter(modeling.load_base(trained, base_dir, quantization="4bit"))

    merged, info = load(merged_dir)
    for kind in ("missing_keys", "unexpected_keys"):
        extra = set(info[kind]) - set(base_info[kind])
        if extra:
            raise MergeCheckFailed(
                f"the merged model does not load cleanly ({kind.replace('_', ' ')}: {', '.join(sorted(extra)[:3])})"
            )
    logits = merged.eval()(input_ids=ids).logits
    return {name: float((logits - ref).abs().max()) for name, ref in expected.items()}


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """transformers' "Loading weights" bars would bury the merge's own report."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()
