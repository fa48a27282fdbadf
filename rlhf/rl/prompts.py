"""Prompts for RL: the first k tokens of documents, drawn as a function of (seed, step, rank) alone, so a resumed run
sees exactly the prompts and samples the uninterrupted one would have."""

from __future__ import annotations

import torch

from rlhf.errors import UserError


class Prompts:
    """Prompts are the first k tokens (k drawn per prompt) of documents, tokenized exactly as in SFT."""

    def __init__(self, texts: list[str], tokenizer, min_tokens: int, max_tokens: int, seed: int, section: str = "ppo"):
        self.tokens = [ids[:max_tokens] for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
        self.tokens = [ids for ids in self.tokens if len(ids) >= min_tokens]
        if not self.tokens:
            raise UserError(
                f"no document has {min_tokens} tokens to make a prompt from; check {section}.prompt_min_tokens"
            )
        self.min_tokens, self.max_tokens, self.seed = min_tokens, max_tokens, seed

    def batch(self, step: int, size: int, rank: int = 0, world_size: int = 1) -> list[list[int]]:
        """The prompts of one step: a function of (seed, step, rank) alone, so a resumed run sees the same ones."""
        n = len(self.tokens)
        out = []
        for j in range(size):
            index = step * size * world_size + rank * size + j
            epoch, pos = divmod(index, n)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
            out.append(self.tokens[int(order[pos])])
        g = torch.Generator().manual_seed(self.seed * 7919 + step * 31 + rank)
        lengths = torch.randint(self.min_tokens, self.max_tokens + 1, (size,), generator=g).tolist()
        return [ids[:k] for ids, k in zip(out, lengths)]


def left_pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(s)
        mask[i, width - len(s) :] = 1
    return ids.to(device), mask.to(device)


def pad_left(x: torch.Tensor, width: int, value: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (width - x.shape[1], 0), value=value)


def pad_right(x: torch.Tensor, width: int, value: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)


def step_seed(seed: int, step: int, rank: int) -> int:
    """Sampling in step N is seeded by (seed, N, rank): resuming at any step reproduces it exactly."""
    return (seed * 1_000_003 + step * 9176 + rank * 131) % (2**63)
