"""What a reward model directory holds, readable without torch: the budget and the reward-spec reader ask whether a
name is such a directory before anything heavy is imported."""

from __future__ import annotations

from pathlib import Path

SCORE_HEAD = "score_head.safetensors"
INFO = "reward_model.json"  # beside the adapter: the base it was trained on (path and fingerprint), the hidden size


def reward_adapter_dir(name: str) -> Path | None:
    """The adapter directory of a reward model `rlhf reward` wrote, given RUN/reward or RUN/reward/adapter; None when
    `name` is not such a directory."""
    path = Path(name).expanduser()
    for candidate in (path / "adapter", path):
        if (candidate / SCORE_HEAD).is_file() and (candidate / "adapter_config.json").is_file():
            return candidate
    return None
