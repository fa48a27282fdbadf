"""`rlhf.testing.cuda_rules`: raises on the calls CUDA refuses and the CPU runs, and on nothing else.

Each refused call is first run without the mode, to show that the CPU accepts it: without the mode the test fails.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from rlhf.testing.cuda_rules import CudaRuleError, cuda_rules, paused

HALF = [torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def cpu_alone():
    """These tests show what the CPU accepts without the rules: under `pytest --cuda-rules` they are paused here and
    each test's own `cuda_rules()` applies."""
    with paused():
        yield


@pytest.mark.parametrize("dtype", HALF)
def test_mixed_layer_norm_raises_where_the_cpu_runs_it(dtype):
    norm = nn.LayerNorm(8)  # fp32 weight and bias
    x = torch.randn(2, 8, dtype=dtype)
    assert norm(x).dtype == dtype  # the CPU's mixed-dtype kernel
    with cuda_rules(), pytest.raises(CudaRuleError, match="native_layer_norm: .* input with torch.float32 weight"):
        norm(x)


@pytest.mark.parametrize("dtype", HALF)
def test_mixed_group_norm_raises(dtype):
    norm = nn.GroupNorm(2, 8)
    x = torch.randn(2, 8, 3, dtype=dtype)
    assert norm(x).dtype == dtype
    with cuda_rules(), pytest.raises(CudaRuleError, match="native_group_norm"):
        norm(x)


@pytest.mark.parametrize("dtype", [*HALF, torch.float32])
def test_norms_in_one_dtype_pass_forward_and_backward(dtype):
    layer, group = nn.LayerNorm(8).to(dtype), nn.GroupNorm(2, 8).to(dtype)
    x = torch.randn(2, 8, dtype=dtype, requires_grad=True)
    with cuda_rules():
        (layer(x).float().sum() + group(x[..., None]).float().sum()).backward()
    assert x.grad.dtype == dtype


def test_mixed_layer_norm_backward_raises():
    norm = nn.LayerNorm(8)
    x = torch.randn(2, 8, dtype=torch.bfloat16, requires_grad=True)
    y = norm(x)  # forward outside the mode: only the backward is checked
    with cuda_rules(), pytest.raises(CudaRuleError, match="native_layer_norm_backward"):
        y.float().sum().backward()


@pytest.mark.parametrize("dtype", HALF)
def test_autocast_runs_norms_in_fp32_as_cuda_autocast_does(dtype):
    """CUDA autocast casts layer_norm to fp32 (CPU autocast does not): allowed, fp32 out, and fp32 in backward too,
    also when a checkpointed layer recomputes it there."""
    norm = nn.LayerNorm(8)
    x = torch.randn(2, 8, dtype=dtype, requires_grad=True)
    with torch.autocast("cpu", dtype=dtype):
        assert norm(x).dtype == dtype  # CPU autocast alone
    with cuda_rules():
        with torch.autocast("cpu", dtype=dtype):
            y = norm(x)
            z = torch.utils.checkpoint.checkpoint(norm, x, use_reentrant=True)
        assert y.dtype == z.dtype == torch.float32
        (y.sum() + z.sum()).backward()
    with torch.autocast("cpu", dtype=dtype):
        assert norm(x).dtype == dtype, "the fp32 policy ends with the mode"


@pytest.mark.parametrize(
    "call",
    [
        lambda a, b: a @ b,
        lambda a, b: F.linear(a, b.T),
        lambda a, b: torch.addmm(torch.zeros(4, 4), a, b),
        lambda a, b: torch.bmm(a[None], b[None]),
    ],
    ids=["matmul", "linear", "addmm", "bmm"],
)
def test_matmuls_of_mixed_dtypes_raise_with_the_op_named(call):
    a, b = torch.randn(4, 4, dtype=torch.bfloat16), torch.randn(4, 4)
    with cuda_rules(), pytest.raises(CudaRuleError, match="mixed dtypes"):
        call(a, b)
    with cuda_rules():
        call(a.float(), b)  # one dtype: allowed


def test_a_norm_that_changes_the_activation_dtype_raises():
    """A Llama-style RMSNorm with an fp32 weight returns fp32 for bf16 hidden states (today's Llama failure)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(8)
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    assert norm(x).dtype == torch.float32
    with cuda_rules(), pytest.raises(CudaRuleError, match="LlamaRMSNorm took torch.bfloat16 .* returned torch.float32"):
        norm(x)
    with cuda_rules():
        assert norm.to(torch.bfloat16)(x).dtype == torch.bfloat16


class Block(nn.Module):
    def forward(self, hidden_states):
        return hidden_states.float() * 2  # a dtype change with no norm and no matmul


class Model(nn.Module):
    _no_split_modules = ["Block"]  # how transformers names its decoder layers

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Block()])

    def forward(self, x):
        for layer in self.layers:
            x = layer(hidden_states=x)
        return x


def test_a_decoder_layer_that_changes_the_activation_dtype_raises():
    model, x = Model(), torch.randn(2, 8, dtype=torch.float16)
    assert model(x).dtype == torch.float32
    with cuda_rules(), pytest.raises(CudaRuleError, match="Block took torch.float16 hidden states and returned"):
        model(x)
    with cuda_rules(), torch.autocast("cpu", dtype=torch.float16), pytest.raises(CudaRuleError, match="Block"):
        model(x)  # autocast excuses a norm's fp32 output, never a layer's
    with cuda_rules():
        assert model(x.float()).dtype == torch.float32  # fp32 in, fp32 out


def test_the_mode_leaves_nothing_behind():
    from rlhf.testing import cuda_rules as rules

    before = list(rules._autocast_norms)  # a session under `pytest --cuda-rules` holds one registration
    with cuda_rules(), cuda_rules():
        pass
    assert rules._autocast_norms == before
    Model()(torch.randn(2, 8, dtype=torch.float16))  # no hook left to raise
    nn.LayerNorm(8)(torch.randn(2, 8, dtype=torch.float16))


def test_paused_rules_and_rules_again_inside():
    """`pytest --cuda-rules` runs the session under the rules; a pause lets a test show the CPU alone, and a
    `cuda_rules()` inside a pause applies again."""
    norm, x = nn.LayerNorm(8), torch.randn(2, 8, dtype=torch.float16)
    with cuda_rules():
        with paused():
            norm(x)
            with cuda_rules(), pytest.raises(CudaRuleError):
                norm(x)
            norm(x)
        with pytest.raises(CudaRuleError):
            norm(x)
