"""Text datasets: loading (hub id, local file or directory, fixture), filtering, and tokenizing into training blocks."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from rlhf.config import DataConfig
from rlhf.errors import UserError
from rlhf.resolve import _download, resolve_dataset

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
DATA_PATTERNS = ["*.parquet", "*.json", "*.jsonl", "*.csv", "*.txt", "*.arrow", "README.md"]


def _split_files(directory: Path) -> dict[str, list[str]]:
    """Map split names to data files in a directory laid out as train.jsonl / test.parquet / train-0000.csv ..."""
    files: dict[str, list[str]] = {}
    for path in sorted(directory.rglob("*")):
        if path.suffix in FILE_BUILDERS and path.is_file():
            split = path.stem.split("-")[0].split(".")[0]
            files.setdefault(split, []).append(str(path))
    return files


def _load_files(builder: str, files: dict[str, list[str]], where: Path, setting: str):
    import datasets

    for path in (Path(f) for fs in files.values() for f in fs):
        size = path.stat().st_size
        if size == 0 or (builder != "parquet" and size < 4096 and not path.read_bytes().strip()):
            raise UserError(f"{path} is empty ({setting}); put the data in it, or point {setting} at another file")
    try:
        return datasets.load_dataset(builder, data_files=files)
    except Exception as exc:  # a malformed file surfaces as DatasetGenerationError with the parser's error inside
        cause = exc.__cause__ or exc
        detail = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        fields = "the field data.text_column names" if setting == "data.dataset" else f"the fields {setting} needs"
        hint = f" (one JSON object per line, each with {fields})" if builder == "json" else ""
        problem = f"cannot read {where} ({setting}) as {builder} ({type(cause).__name__}: {detail}); fix the file{hint}"
        raise UserError(problem) from None


def _load_local(path: Path, config_name: str | None, setting: str):
    import datasets

    if path.is_file():
        builder = FILE_BUILDERS.get(path.suffix)
        if builder is None:
            raise UserError(f"cannot read {path}: use a .json/.jsonl/.csv/.parquet/.txt file or a dataset directory")
        return _load_files(builder, {"train": [str(path)]}, path, setting)
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        loaded = datasets.load_from_disk(str(path))
        return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict({"train": loaded})
    files = _split_files(path)
    suffixes = {Path(f).suffix for fs in files.values() for f in fs}
    if files and len({FILE_BUILDERS[s] for s in suffixes}) == 1 and not (path / "README.md").is_file():
        return _load_files(FILE_BUILDERS[suffixes.pop()], files, path, setting)
    try:
        return datasets.load_dataset(str(path), config_name)
    except (FileNotFoundError, ValueError) as exc:
        raise UserError(f"cannot load a dataset from {path} ({setting}): {str(exc).splitlines()[0]}") from None


def load_splits(cfg: DataConfig, setting: str = "data.dataset"):
    """All splits of the configured dataset as a DatasetDict; `setting`, the recipe key naming it, is for messages."""
    source = resolve_dataset(cfg.dataset)
    if isinstance(source, Path):
        return _load_local(source, cfg.config_name, setting)
    # A hub dataset: fetch the files through huggingface_hub, which fails fast and clearly when offline, then read
    # the local snapshot (datasets alone would retry for half a minute and then print a traceback).
    snapshot = _download(source, None, "dataset", DATA_PATTERNS)
    return _load_local(snapshot, cfg.config_name, setting)


def load_texts(cfg: DataConfig, split: str, min_chars: int | None = None, setting: str | None = None) -> list[str]:
    """The filtered text column of one split. `min_chars` raises data.min_chars; `setting` is the recipe key that set
    it, and the documents it drops are counted on stderr under that name."""
    splits = load_splits(cfg)
    if split not in splits:
        raise UserError(
            f"dataset '{cfg.dataset}' has no split '{split}'; its splits are: {', '.join(splits)} "
            f"(set data.train_split / data.eval_split)"
        )
    ds = splits[split]
    if cfg.text_column not in ds.column_names:
        raise UserError(
            f"dataset '{cfg.dataset}' has no column '{cfg.text_column}'; its columns are: "
            f"{', '.join(ds.column_names)} (set data.text_column)"
        )
    column = ds[cfg.text_column]
    if column and not any(isinstance(t, str) for t in column):
        kinds = {c: getattr(ds.features[c], "dtype", None) for c in ds.column_names}
        text_columns = [c for c, kind in kinds.items() if kind in ("string", "large_string")]
        hint = f" (text columns: {', '.join(text_columns)})" if text_columns else ""
        raise UserError(
            f"dataset '{cfg.dataset}' column '{cfg.text_column}' holds {type(column[0]).__name__} values, not text; "
            f"set data.text_column to a column of text{hint}"
        )
    limit = cfg.min_chars if min_chars is None else max(cfg.min_chars, min_chars)
    if setting and limit > cfg.min_chars and int(os.environ.get("RANK", "0")) == 0:
        short = sum(1 for t in column if isinstance(t, str) and t.strip() and cfg.min_chars < len(t) <= limit)
        if short:
            print(
                f"{setting.split('.')[0]}: {short} of {len(column)} '{split}' documents have {limit} characters or "
                f"fewer and are left out ({setting}={limit})",
                file=sys.stderr,
            )
    texts = [t for t in column if isinstance(t, str) and len(t) > limit and t.strip()]
    if cfg.max_documents is not None:
        texts = texts[: cfg.max_documents]
    if not texts:
        raise UserError(
            f"dataset '{cfg.dataset}' split '{split}' is empty after filtering "
            f"({len(ds)} documents, none longer than {limit} characters); lower "
            f"{setting if setting and limit > cfg.min_chars else 'data.min_chars'} or check the data"
        )
    return texts


@dataclass
class Blocks:
    """Tokenized training examples: input ids, attention masks and labels (-100 where the loss ignores a position)."""

    input_ids: list[list[int]]
    attention_mask: list[list[int]]
    labels: list[list[int]]
    n_documents: int
    n_truncated: int

    def __len__(self) -> int:
        return len(self.input_ids)


def tokenize_blocks(texts: list[str], tokenizer, block_size: int, pack: bool) -> Blocks:
    """Tokenize documents, end each with EOS, and cut them into blocks of `block_size` tokens.

    pack=True joins all documents (EOS between them) and cuts the stream into full blocks, the reference recipe's
    grouping: no padding, every token counts. pack=False keeps one document per block, truncated to the block and
    right-padded; padded positions get label -100 by position, never by token id (the pad id may equal EOS).
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError("the tokenizer has no EOS token; documents could not be separated")
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    docs = [ids + [eos] for ids in encoded]
    if pack:
        stream = [t for doc in docs for t in doc]
        n_blocks = len(stream) // block_size
        if n_blocks == 0:
            raise UserError(
                f"the data has {len(stream)} tokens, fewer than one block of sft.block_size={block_size}; "
                f"lower sft.block_size or add data"
            )
        ids = [stream[i * block_size : (i + 1) * block_size] for i in range(n_blocks)]
        return Blocks(ids, [[1] * block_size for _ in ids], [list(b) for b in ids], len(docs), 0)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    ids, masks, labels, truncated = [], [], [], 0
    for doc in docs:
        truncated += len(doc) > block_size
        doc = doc[:block_size]
        n_pad = block_size - len(doc)
        ids.append(doc + [pad] * n_pad)
        masks.append([1] * len(doc) + [0] * n_pad)
        labels.append(doc + [-100] * n_pad)
    return Blocks(ids, masks, labels, len(docs), truncated)


# --- SFT on a task: prompt/completion pairs and conversations, loss on the answer only -------------------------------

SFT_FORMATS = ("text", "prompt-completion", "messages")


def sft_format(columns: list[str], cfg: DataConfig) -> str:
    """Which SFT format the rows have, by TRL's column names: prompt + completion, then messages, then plain text."""
    if cfg.format == "auto":
        if "prompt" in columns and "completion" in columns:
            return "prompt-completion"
        return "messages" if "messages" in columns else "text"
    needed = {"text": [cfg.text_column], "prompt-completion": ["prompt", "completion"], "messages": ["messages"]}
    missing = [c for c in needed[cfg.format] if c not in columns]
    if missing:
        raise UserError(
            f"dataset '{cfg.dataset}' has no column {', '.join(repr(c) for c in missing)} for data.format="
            f"{cfg.format}; its columns are: {', '.join(columns)}"
        )
    return cfg.format


@dataclass
class SftData:
    """One split's SFT rows: `format` text (rows are strings), prompt-completion (rows are (prompt, completion)
    pairs, each a string or a list of messages) or messages (rows are conversations)."""

    format: str
    rows: list


def load_sft_data(cfg: DataConfig, split: str) -> SftData:
    """The rows `rlhf sft` trains on; plain text goes through `load_texts` (filters and all) as before."""
    from rlhf.chat import check_messages, is_conversation

    splits = load_splits(cfg)
    if split not in splits:
        raise UserError(
            f"dataset '{cfg.dataset}' has no split '{split}'; its splits are: {', '.join(splits)} "
            f"(set data.train_split / data.eval_split)"
        )
    ds = splits[split]
    fmt = sft_format(ds.column_names, cfg)
    if fmt == "text":
        return SftData("text", load_texts(cfg, split))
    if cfg.max_documents is not None:
        ds = ds.select(range(min(cfg.max_documents, len(ds))))
    if len(ds) == 0:
        raise UserError(f"dataset '{cfg.dataset}' split '{split}' has no rows")
    rows: list = []
    if fmt == "messages":
        for i, messages in enumerate(ds["messages"]):
            rows.append(check_messages(messages, f"dataset '{cfg.dataset}' [{split}] row {i}, column 'messages'"))
        return SftData(fmt, rows)
    for i, (prompt, completion) in enumerate(zip(ds["prompt"], ds["completion"])):
        where = f"dataset '{cfg.dataset}' [{split}] row {i}"
        if isinstance(prompt, str) and isinstance(completion, str):
            rows.append((prompt, completion))
        elif is_conversation(prompt) and is_conversation(completion):
            rows.append(
                (check_messages(prompt, where + ", 'prompt'"), check_messages(completion, where + ", 'completion'"))
            )
        else:
            raise UserError(
                f"{where}: prompt and completion must both be strings or both lists of {{role, content}} messages "
                f"(got {type(prompt).__name__} and {type(completion).__name__})"
            )
    return SftData(fmt, rows)


@dataclass
class Encoded:
    """One example's ids and which of them the loss counts (1) or ignores (0)."""

    input_ids: list[int]
    loss_mask: list[int]
    prompt_merged: bool = False  # the prompt's last tokens merged with the completion's first (see encode_pair)


def encode_pair(tokenizer, prompt: str | list[dict], completion: str | list[dict]) -> Encoded:
    """Prompt + completion as one sequence whose completion tokens alone count, as TRL's SFT builds it.

    The completion starts where the ids of the prompt alone and of prompt + completion part (normally right after
    the prompt; earlier when the tokenizer merges across the boundary or the template renders the generation prompt
    differently). Plain completions end with EOS so the model learns to stop; a chat template ends the turn itself.
    """
    from rlhf.chat import common_prefix_length, encode_prompt, render_ids

    prompt_ids = encode_prompt(tokenizer, prompt)
    if isinstance(prompt, list):
        full = render_ids(tokenizer, prompt + completion, add_generation_prompt=False)
    else:
        full = list(tokenizer(prompt + completion)["input_ids"])
        if not full or full[-1] != tokenizer.eos_token_id:
            full.append(tokenizer.eos_token_id)
    start = common_prefix_length(prompt_ids, full)
    return Encoded(full, [0] * start + [1] * (len(full) - start), start < len(prompt_ids))


def _has_generation_block(template: str | None) -> bool:
    import re

    return bool(template) and re.search(r"\{%-?\s*generation\s*-?%\}", template) is not None


def encode_conversation(tokenizer, messages: list[dict]) -> Encoded:
    """A conversation whose assistant turns alone count.

    A template that marks assistant turns with `{% generation %}` gives the mask itself (transformers'
    `return_assistant_tokens_mask`, what TRL's `assistant_only_loss` uses). Most hub templates have no such marks
    (SmolLM2's, Llama 3's), and TRL then refuses; here each assistant turn is found instead as the ids between the
    conversation before it with the generation prompt and the conversation up to its end — the same prefix rule as a
    prompt-completion pair.
    """
    from rlhf.chat import common_prefix_length, render_ids

    if _has_generation_block(getattr(tokenizer, "chat_template", None)):
        out = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        return Encoded(list(out["input_ids"]), [int(m) for m in out["assistant_masks"]])
    full = render_ids(tokenizer, messages, add_generation_prompt=False)
    mask = [0] * len(full)
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i == 0:
            continue
        start = common_prefix_length(render_ids(tokenizer, messages[:i], add_generation_prompt=True), full)
        end = common_prefix_length(render_ids(tokenizer, messages[: i + 1], add_generation_prompt=False), full)
        mask[start:end] = [1] * (end - start)
    return Encoded(full, mask)


@dataclass
class Examples(Blocks):
    """SFT examples of varying length (padded per batch by the collator), with what tokenizing them found."""

    n_dropped: int = 0  # examples with no token left to learn from (none was the answer, or all were cut off)
    n_prompt_merged: int = 0


def tokenize_examples(data: SftData, tokenizer, block_size: int) -> Examples:
    """Prompt-completion pairs or conversations as examples, labels -100 outside the completion / assistant turns.

    An example longer than `block_size` keeps its first `block_size` tokens (as TRL truncates to max_length); one left
    with no counted token is dropped. Both are counted, and `rlhf preview` reports them.
    """
    from rlhf.chat import require_chat_template

    conversational = data.format == "messages" or isinstance(data.rows[0][0], list)
    if conversational:
        require_chat_template(tokenizer, getattr(tokenizer, "name_or_path", "the model"))
    ids, masks, labels = [], [], []
    truncated = dropped = merged = 0
    for row in data.rows:
        enc = encode_conversation(tokenizer, row) if data.format == "messages" else encode_pair(tokenizer, *row)
        merged += enc.prompt_merged
        truncated += len(enc.input_ids) > block_size
        seq, keep = enc.input_ids[:block_size], enc.loss_mask[:block_size]
        if not any(keep[1:]):  # position 0 is never predicted: a causal LM's loss starts at the second token
            dropped += 1
            continue
        ids.append(seq)
        masks.append([1] * len(seq))
        labels.append([t if k else -100 for t, k in zip(seq, keep)])
    if not ids:
        what = "assistant turns" if data.format == "messages" else "completions"
        raise UserError(
            f"no SFT example has a token to learn from: all {len(data.rows)} {what} are empty or lie past "
            f"sft.block_size={block_size}; raise sft.block_size or check the data"
        )
    return Examples(ids, masks, labels, len(data.rows), truncated, n_dropped=dropped, n_prompt_merged=merged)
