"""How log-probs and entropy cut logits into fp32 chunks: torch-free, so that the memory budget sizes the largest
chunk by the very slicing `rlhf.rl.core` uses, without importing torch."""

from __future__ import annotations

from collections.abc import Iterator

# Tokens (rows of the vocabulary axis) turned into fp32 at a time. gpt-neox-20b's vocabulary is 50,432 wide, so a
# full fp32 log_softmax of a 256 x 24 rollout is 1.2 GB on a 24 GB card that already holds the model; one chunk of
# 512 tokens is 0.1 GB.
DEFAULT_CHUNK_TOKENS = 512


def chunk_slices(batch: int, length: int, chunk_tokens: int) -> Iterator[tuple[slice, slice]]:
    """(batch, time) slices covering [batch, length] with at most `chunk_tokens` tokens each.

    Slicing (not reshaping) keeps each chunk a view: logits cut as `out.logits[:, p:-1]` are not contiguous, and a
    reshape of them would copy the whole tensor.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens ({chunk_tokens}) must be a positive integer")
    if length <= chunk_tokens:
        rows = max(1, chunk_tokens // max(length, 1))
        for b in range(0, batch, rows):
            yield slice(b, b + rows), slice(None)
    else:
        for b in range(batch):
            for t in range(0, length, chunk_tokens):
                yield slice(b, b + 1), slice(t, t + chunk_tokens)
