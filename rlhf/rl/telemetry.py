"""What a step reports about itself: seconds per phase, peak memory, metrics rows, samples, tensorboard."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rlhf.io import append_jsonl
from rlhf.memory import peak_rss_bytes


def peak_memory_bytes() -> int:
    """The device's peak: torch's reserved memory on CUDA (what the allocator held), the process's peak RSS on CPU."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_reserved())
    return peak_rss_bytes()


@dataclass
class Timer:
    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, since: float) -> float:
        """Add the time since `since` to phase `name`; returns now, the start of the next phase."""
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - since
        return now


class Log:
    """metrics.jsonl, samples.jsonl and tensorboard of one RL step directory; only the main process writes."""

    def __init__(self, directory: Path, prefix: str, enabled: bool):
        self.directory, self.prefix, self.enabled = directory, prefix, enabled
        self._tb = None
        self._tb_tried = False

    @property
    def metrics_path(self) -> Path:
        return self.directory / "metrics.jsonl"

    @property
    def samples_path(self) -> Path:
        return self.directory / "samples.jsonl"

    def metrics(self, row: dict) -> None:
        if not self.enabled:
            return
        append_jsonl(self.metrics_path, row)
        self._tensorboard(row)

    def samples(self, step: int, prompts: list[str], responses: list[str], rewards: list[float], n: int = 4) -> None:
        if not self.enabled:
            return
        for prompt, response, reward in list(zip(prompts, responses, rewards))[:n]:
            append_jsonl(self.samples_path, {"step": step, "prompt": prompt, "response": response, "reward": reward})

    def _tensorboard(self, row: dict) -> None:
        if not self._tb_tried:
            self._tb_tried = True
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.directory / "tensorboard"))
            except Exception:  # tensorboard is optional at run time
                self._tb = None
        if self._tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(f"{self.prefix}/{key}", value, row["step"])
            self._tb.flush()


def progress(name: str, total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=name, unit="step", disable=not enabled, dynamic_ncols=True)
