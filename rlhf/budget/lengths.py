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
    """(lengths, note): the data's lengths where it can be read here, else None and why not."""
    if step in ("ppo", "grpo"):
        return scan_prompts(recipe, step)
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


def scan_prompts(recipe: Recipe, step: str) -> tuple[DataLengths | None, str]:
    """The longest RL prompt of a prompt dataset (`<step>.dataset`, or the run's data when it has the prompt column),
    tokenized as the step tokenizes it (chat template and all) and within `<step>.max_prompt_tokens` (longer ones are
    left out of training). None for document-prefix prompts, which `prompt_max_tokens` bounds exactly."""
    cfg = getattr(recipe, step)
    if cfg.dataset is None and not _may_be_task_data(recipe):
        return None, ""
    limit = f"{step}.max_prompt_tokens" if cfg.max_prompt_tokens else f"{step}.prompt_max_tokens"
    try:
        from rlhf import modeling
        from rlhf.config import DataConfig
        from rlhf.data import load_splits
        from rlhf.resolve import resolve_tokenizer
        from rlhf.rl.prompts import DatasetPrompts

        source = recipe.data if cfg.dataset is None else DataConfig(dataset=cfg.dataset, config_name=cfg.config_name)
        splits = load_splits(source)
        train_split = source.train_split if cfg.dataset is None else cfg.train_split
        eval_split = source.eval_split if cfg.dataset is None else cfg.eval_split
        if train_split not in splits or cfg.prompt_column not in splits[train_split].column_names:
            return None, ""  # document prefixes, or a mistake the step itself reports in full
        tokenizer = modeling.load_tokenizer(
            resolve_tokenizer(recipe.model.name, recipe.model.revision), recipe.model.trust_remote_code
        )
        rows = splits[train_split].select(range(min(SCAN_ROWS, len(splits[train_split])))).to_list()
        if eval_split in splits:
            rows += splits[eval_split].select(range(min(cfg.eval_prompts, len(splits[eval_split])))).to_list()
        model, where = recipe.model, f"dataset '{source.dataset}'"
        prompts = DatasetPrompts(
            rows, cfg.prompt_column, tokenizer, cfg.max_prompt_tokens, 0, model.chat_template, model.name, where
        )
        if not len(prompts):
            return None, ""
        longest = max(map(len, prompts.tokens))
        return DataLengths(prompt_tokens=longest, source=f"the longest of {len(rows)} prompts"), ""
    except Exception as exc:  # planning without the data: the recipe's limit, said so
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return None, f"prompts sized by {limit}: the prompt data could not be scanned here ({reason})"
