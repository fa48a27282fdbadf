"""Text datasets: loading (hub id, local file or directory, fixture), filtering, and tokenizing into training blocks."""

from __future__ import annotations

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


def load_texts(cfg: DataConfig, split: str, min_chars: int | None = None) -> list[str]:
    """The filtered text column of one split."""
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
    texts = [t for t in column if isinstance(t, str) and len(t) > limit and t.strip()]
    if cfg.max_documents is not None:
        texts = texts[: cfg.max_documents]
    if not texts:
        raise UserError(
            f"dataset '{cfg.dataset}' split '{split}' is empty after filtering "
            f"({len(ds)} documents, none longer than {limit} characters); lower data.min_chars or check the data"
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
