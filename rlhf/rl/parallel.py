"""Data parallelism through accelerate: one `Parallel` per process, the same code on gloo (CPU) and nccl (CUDA).

`accelerate launch --multi_gpu -m rlhf ppo ...` starts one process per device; here each one builds an `Accelerator`,
which joins the process group, and the trainable module is wrapped in DDP, so gradients are averaged by DDP's bucketed
all-reduce during backward. Collectives on scalars (agreeing to skip a batch, metrics) use accelerate's
`reduce`/`gather` on tensors that live on the process's device, which nccl requires.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn


class Parallel:
    def __init__(self):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        self.accelerator = Accelerator(
            # Without CUDA, accelerate only joins a multi-process group when told it runs on the CPU (gloo).
            cpu=not torch.cuda.is_available(),
            # Precision is the recipe's (model.dtype, fp32 adapters); an accelerate config's fp16 autocast would
            # silently change the numbers the PPO ratio and the resume test depend on.
            mixed_precision="no",
            # Every trainable tensor (LoRA, value head) takes part in every forward; reentrant checkpointing is
            # incompatible with find_unused_parameters (parameters marked ready twice).
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
        )
        self.rank = self.accelerator.process_index
        self.world_size = self.accelerator.num_processes
        self.is_main = self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def wrap(self, module: nn.Module) -> nn.Module:
        """DDP over the trainable parameters only (the module itself when there is one process)."""
        if not self.distributed:
            return module
        # The frozen base is loaded identically by every rank: broadcasting it at start (20 GB of int8 for
        # gpt-neox-20b) and its buffers before every forward would be wasted traffic and a bucket of device memory.
        module._ddp_params_and_buffers_to_ignore = [n for n, p in module.named_parameters() if not p.requires_grad] + [
            n for n, _ in module.named_buffers()
        ]
        return self.accelerator.prepare_model(module, device_placement=False)

    def no_sync(self, module: nn.Module, sync: bool) -> AbstractContextManager:
        """Skip the gradient all-reduce for all but the last micro-batch of an accumulated mini-batch."""
        if sync or not self.distributed:
            return nullcontext()
        return self.accelerator.no_sync(module)

    def all_true(self, flag: bool) -> bool:
        """True on every rank when the flag is true on every rank: ranks must agree on skipping a batch or stopping,
        or one of them waits forever in the next collective."""
        if not self.distributed:
            return flag
        failed = torch.tensor([0.0 if flag else 1.0], device=self.device)
        return float(self.accelerator.reduce(failed, reduction="sum").item()) == 0.0

    def mean(self, value: float) -> float:
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        return float(self.accelerator.reduce(t, reduction="mean").item())

    def sum(self, value: float) -> float:
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        return float(self.accelerator.reduce(t, reduction="sum").item())

    def means(self, values: dict[str, float]) -> dict[str, float]:
        """Each value averaged over the ranks, in one collective (every rank passes the same keys)."""
        if not self.distributed:
            return values
        t = torch.tensor(list(values.values()), dtype=torch.float64, device=self.device)
        return dict(zip(values, self.accelerator.reduce(t, reduction="mean").tolist()))

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's rows, concatenated (all ranks hold the same number of rows)."""
        if not self.distributed:
            return tensor
        return self.accelerator.gather(tensor.to(self.device).contiguous())

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def check_in_sync(self, params: list[nn.Parameter]) -> None:
        """Every rank must hold the same weights after training; a difference is a bug, not noise."""
        if not self.distributed:
            return
        total = torch.tensor([sum(p.detach().double().sum().item() for p in params)], dtype=torch.float64)
        sums = self.gather(total)
        spread = float((sums.max() - sums.min()).item())
        if spread > 1e-9 * max(1.0, float(sums.abs().max().item())):
            raise RuntimeError(f"ranks hold different weights after training (checksums {sums.tolist()})")
