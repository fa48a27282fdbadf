"""CUDA's dtype rules on the CPU: raise where a CUDA kernel would refuse a call that the CPU quietly accepts.

The CPU has mixed-dtype kernels that CUDA lacks, so a half-precision run can pass every CPU test and stop at its first
forward on a GPU. `cuda_rules()` runs code under torch's own dispatch (a `TorchDispatchMode` sees every aten call
after autocast has cast its inputs, as the CUDA kernel would receive them) and module hooks, and raises
`CudaRuleError` on:

- `native_layer_norm` / `native_group_norm` (and their backward) whose weight or bias dtype differs from the input's:
  CUDA's kernels read the parameters in the input's dtype ("expected scalar type Half but found Float",
  pytorch/pytorch#135969); the CPU has a mixed kernel. CUDA autocast runs both in fp32 (its fp32 list), CPU autocast
  leaves them alone: inside an autocast region they run in fp32 here too, as CUDA would (`cuda_autocast_norms`).
- matrix products (`mm`, `addmm`, `bmm`, `baddbmm`, `addbmm`, `mv`, `addmv`, `dot`) with floating inputs of different
  dtypes: CUDA refuses them ("expected m1 and m2 to have the same dtype"), the CPU mostly does too; caught here first,
  with the op named.
- a norm or a decoder layer (a class in the model's `_no_split_modules`) whose hidden-state output has another dtype
  than its input: activations then change dtype inside a layer (an fp32 norm returning fp32 into half-precision
  weights), which the memory budget, counting activations in `model.dtype`, does not expect. Inside autocast a norm
  may return fp32 (autocast's own policy), a decoder layer still may not.

Only what runs on the calling thread is seen (autograd runs a CPU backward there); a compiled graph is not.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten


class CudaRuleError(RuntimeError):
    """A call the CPU accepted but CUDA would refuse (or a dtype change the budget does not count)."""


_paused = [0]  # > 0: the rules look away (`paused`), e.g. while a test shows what the CPU alone accepts


# op -> positions of (the input, then the parameters that must share its dtype)
_NORMS = {
    aten.native_layer_norm.default: (0, (2, 3)),
    aten.native_layer_norm_backward.default: (1, (5, 6)),
    aten.native_group_norm.default: (0, (1, 2)),
    aten.native_group_norm_backward.default: (1, (4,)),
}
_MATMULS = {
    aten.mm.default,
    aten.addmm.default,
    aten.bmm.default,
    aten.baddbmm.default,
    aten.addbmm.default,
    aten.mv.default,
    aten.addmv.default,
    aten.dot.default,
}


def _autocast_on() -> bool:
    return torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda")


_autocast_norms: list = []  # [library, users]: one registration however deeply nested


def _fp32(t):
    return t.float() if _floating(t) and not _paused[0] else t


def _layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5, cudnn_enable=True):
    with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)):
        return aten.layer_norm(_fp32(input), normalized_shape, _fp32(weight), _fp32(bias), eps, cudnn_enable)


def _group_norm(input, num_groups, weight=None, bias=None, eps=1e-5, cudnn_enabled=True):
    with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)):
        return aten.group_norm(_fp32(input), num_groups, _fp32(weight), _fp32(bias), eps, cudnn_enabled)


@contextmanager
def cuda_autocast_norms() -> Iterator[None]:
    """CPU autocast with CUDA autocast's policy for `layer_norm` and `group_norm`: run in fp32 (inputs and
    parameters), where CPU autocast leaves them in the input's dtype with a mixed kernel. Registered as their
    AutocastCPU kernels, so a checkpointed layer recomputed in backward (under the autocast its forward had) gets it
    too."""
    if not _autocast_norms:
        lib = torch.library.Library("aten", "IMPL")
        lib.impl("layer_norm", _layer_norm, "AutocastCPU")
        lib.impl("group_norm", _group_norm, "AutocastCPU")
        _autocast_norms[:] = [lib, 0]
    _autocast_norms[1] += 1
    try:
        yield
    finally:
        _autocast_norms[1] -= 1
        if not _autocast_norms[1]:
            _autocast_norms.pop(0)._destroy()
            _autocast_norms.clear()


def _floating(value) -> bool:
    return isinstance(value, Tensor) and value.is_floating_point()


class _DispatchRules(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _paused[0]:
            pass
        elif func in _NORMS:
            where, params = _NORMS[func]
            x = args[where]
            for i in params:
                p = args[i] if i < len(args) else None
                if _floating(p) and p.dtype != x.dtype:
                    raise CudaRuleError(
                        f"{func.name()}: {x.dtype} input with {p.dtype} weight/bias; CUDA's kernel reads the "
                        f"parameters in the input's dtype and raises (the CPU has a mixed-dtype kernel)"
                    )
        elif func in _MATMULS:
            dtypes = {a.dtype for a in (*args, *kwargs.values()) if _floating(a)}
            if len(dtypes) > 1:
                names = ", ".join(sorted(str(d) for d in dtypes))
                raise CudaRuleError(f"{func.name()}: mixed dtypes ({names}); CUDA needs one dtype for all operands")
        return func(*args, **kwargs)


def _first_floating(values) -> Tensor | None:
    for value in values:
        if _floating(value):
            return value
        if isinstance(value, tuple | list) and value:
            found = _first_floating(value)
            if found is not None:
                return found
    return None


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm | nn.GroupNorm | nn.RMSNorm) or "Norm" in type(module).__name__


class _LayerRules:
    """Module hooks: a norm or decoder layer must hand on its hidden states in the dtype it received them."""

    def __init__(self) -> None:
        self.blocks: set[str] = set()
        self.handles = []

    def __enter__(self):
        reg = nn.modules.module
        self.handles = [
            reg.register_module_forward_pre_hook(self._learn_blocks),
            reg.register_module_forward_hook(self._check, with_kwargs=True),
        ]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()

    def _learn_blocks(self, module: nn.Module, args) -> None:
        # A transformers model names its decoder-layer classes (what device maps never split): the layers to watch.
        self.blocks.update(getattr(module, "_no_split_modules", None) or ())

    def _check(self, module: nn.Module, args, kwargs, output) -> None:
        name = type(module).__name__
        if _paused[0] or (name not in self.blocks and not _is_norm(module)):
            return
        hidden = kwargs.get("hidden_states")
        x = hidden if _floating(hidden) else _first_floating((*args, *kwargs.values()))
        y = _first_floating((output,)) if not _floating(output) else output
        if x is None or y is None or x.dtype == y.dtype or (_autocast_on() and name not in self.blocks):
            return
        raise CudaRuleError(
            f"{name} took {x.dtype} hidden states and returned {y.dtype}: activations change dtype inside the "
            f"layer, which the memory budget (activations in model.dtype) does not count, and half-precision weights "
            f"downstream meet {y.dtype} inputs"
        )


@contextmanager
def paused() -> Iterator[None]:
    """The rules of the enclosing `cuda_rules()` off (autocast's fp32 norms too) until a new `cuda_rules()`."""
    _paused[0] += 1
    try:
        yield
    finally:
        _paused[0] -= 1


@contextmanager
def cuda_rules() -> Iterator[None]:
    """Raise CudaRuleError wherever CUDA would refuse what the CPU runs (see the module docstring); in force inside
    a `paused()` too."""
    outer, _paused[0] = _paused[0], 0
    try:
        with _LayerRules(), cuda_autocast_norms(), _DispatchRules():
            yield
    finally:
        _paused[0] = outer
