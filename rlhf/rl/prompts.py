"""Prompts for RL, drawn as a function of (seed, step, rank) alone, so a resumed run sees exactly the prompts and
samples the uninterrupted one would have: the first k tokens of documents (`Prompts`), or a dataset's prompt column
whose rows travel with their prompts to the reward (`DatasetPrompts`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from rlhf.chat import check_messages, encode_prompt, require_chat_template, set_chat_template
from rlhf.errors import UserError


def draw_indices(n: int, seed: int, step: int, size: int, rank: int, world_size: int) -> list[int]:
    """Rows of one step on one rank: every rank's prompts of every step are consecutive slices of one shuffled order
    per epoch, so the ranks never share a prompt within an epoch and a resumed run draws the same ones."""
    out = []
    for j in range(size):
        index = step * size * world_size + rank * size + j
        epoch, pos = divmod(index, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.append(int(order[pos]))
    return out


@dataclass
class PromptBatch:
    tokens: list[list[int]]
    rows: list[dict[str, Any]] | None  # each prompt's dataset row (None: document prefixes have no row)


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
        out = [self.tokens[i] for i in draw_indices(len(self.tokens), self.seed, step, size, rank, world_size)]
        g = torch.Generator().manual_seed(self.seed * 7919 + step * 31 + rank)
        lengths = torch.randint(self.min_tokens, self.max_tokens + 1, (size,), generator=g).tolist()
        return [ids[:k] for ids, k in zip(out, lengths)]

    def draw(self, step: int, size: int, rank: int = 0, world_size: int = 1) -> PromptBatch:
        return PromptBatch(self.batch(step, size, rank, world_size), None)


class DatasetPrompts:
    """Prompts from a dataset's prompt column (a string, or messages rendered with the chat template and the
    assistant's turn opened), each kept with its row: the reward receives the row's other columns with each sample.

    Prompts longer than `max_tokens` are left out (counted in `n_too_long`) rather than cut: cutting from the left
    would drop the instruction or the question while the row's answer stays, and the reward would judge a completion
    to a question the model never saw.
    """

    def __init__(self, rows: list[dict[str, Any]], column: str, tokenizer, max_tokens: int | None, seed: int,
                 chat_template: str | None, model_name: str, where: str):  # fmt: skip
        self.seed, self.column = seed, column
        set_chat_template(tokenizer, chat_template)
        tokens = []
        for i, row in enumerate(rows):
            prompt = row[column]
            if not isinstance(prompt, str):
                prompt = check_messages(prompt, f"{where}, row {i}, column '{column}'")
                require_chat_template(tokenizer, model_name)
            # As SFT encodes the prompt its completion follows (rlhf.chat): what the model learned to continue.
            tokens.append(encode_prompt(tokenizer, prompt))
        texts = tokenizer.batch_decode(tokens) if tokens else []
        keep = [i for i, ids in enumerate(tokens) if ids and (max_tokens is None or len(ids) <= max_tokens)]
        self.n_too_long = sum(1 for ids in tokens if max_tokens is not None and len(ids) > max_tokens)
        self.tokens = [tokens[i] for i in keep]
        self.rows = [rows[i] for i in keep]
        self.texts = [texts[i] for i in keep]
        self.columns = list(rows[0]) if rows else [column]
        self.conversational = any(not isinstance(row[column], str) for row in self.rows)

    def __len__(self) -> int:
        return len(self.tokens)

    def batch(self, step: int, size: int, rank: int = 0, world_size: int = 1) -> list[list[int]]:
        return self.draw(step, size, rank, world_size).tokens

    def draw(self, step: int, size: int, rank: int = 0, world_size: int = 1) -> PromptBatch:
        picked = draw_indices(len(self.tokens), self.seed, step, size, rank, world_size)
        return PromptBatch([self.tokens[i] for i in picked], [self.rows[i] for i in picked])


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
