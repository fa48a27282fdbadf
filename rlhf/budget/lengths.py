"""Sequence lengths from the data, where the recipe's limits would overstate them.

A recipe bounds a sequence (`sft.block_size`, the RL prompt limits), but task data is usually far shorter: the
arithmetic pairs are ~35 tokens under a block of 64, GSM8K questions ~100 tokens under a limit of 256. Each example of
a batch is padded to the batch's longest only, so the longest example is what the memory holds. Documents are cut into
(or padded to) whole blocks, and document-prefix prompts are drawn up to `prompt_max_tokens`: there the recipe's
numbers are exact and nothing is scanned.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlhf.config import Recipe

SCAN_ROWS = 5000  # a quick scan: the longest of the first rows (the step itself measures all it loads)


@dataclass(frozen=True)
class DataLengths:
    """Token lengths measured on the data; None where the recipe's limit applies."""

    sft_tokens: int | None = None  # the longest SFT example, capped at sft.block_size
    prompt_tokens: int | None = None  # the longest RL prompt
    source: str = ""  # where the numbers come from, for the report


def sft_lengths(examples, block_size: int, source: str) -> DataLengths:
    """From examples `rlhf sft` tokenized (rlhf.data.Examples): the longest, which sets a padded batch's width."""
    return DataLengths(sft_tokens=min(block_size, max(map(len, examples.input_ids))), source=source)


def scan(recipe: Recipe, step: str) -> tuple[DataLengths | None, str]:
    """(lengths, note) for `rlhf budget`: the data's lengths where it can be read here, else None and why not."""
    if step != "sft" or not _may_be_task_data(recipe):
        return None, ""
    try:
        from rlhf import modeling
        from rlhf.data import load_sft_data, tokenize_examples
        from rlhf.resolve import resolve_model

        tokenizer = modeling.load_tokenizer(
            resolve_model(recipe.model.name, recipe.model.revision),
            recipe.model.trust_remote_code,
            recipe.model.chat_template,
        )
        data = load_sft_data(recipe.data, recipe.data.train_split)
        if data.format == "text":
            return None, ""
        data.rows = data.rows[:SCAN_ROWS]
        examples = tokenize_examples(data, tokenizer, recipe.sft.block_size)
        return sft_lengths(examples, recipe.sft.block_size, _scanned(len(data.rows))), ""
    except Exception as exc:  # planning without the data (another machine, no hub): the recipe's limit, said so
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return None, f"sequences sized by sft.block_size: the data could not be scanned here ({reason})"


def _scanned(n: int) -> str:
    return f"the longest of {n} examples{' (the first)' if n == SCAN_ROWS else ''}"


def _may_be_task_data(recipe: Recipe) -> bool:
    """Pairs or conversations: said by data.format, or possible with format auto when the data is here to look at
    (a fixture or a local path). A hub dataset of format auto is not downloaded just to plan."""
    from pathlib import Path

    from rlhf.resolve import is_fixture

    if recipe.data.format != "auto":
        return recipe.data.format != "text"
    return is_fixture(recipe.data.dataset) or Path(recipe.data.dataset).expanduser().exists()
