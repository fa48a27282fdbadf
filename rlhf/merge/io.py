"""Writing safetensors shards whose headers are planned up front, and the merged model directory's other files (config,
index, tokenizer). Reading a checkpoint's headers and one tensor at a time is `rlhf.tensorfiles`'s."""

from __future__ import annotations

import json
import math
import shutil
import struct
from collections import defaultdict
from pathlib import Path
from typing import Any, BinaryIO

import torch

from rlhf.errors import UserError
from rlhf.tensorfiles import SAFETENSORS_NAMES, TensorEntry
from rlhf.units import parse_size


def group_by_file(entries: list[TensorEntry]) -> dict[Path, list[TensorEntry]]:
    files: dict[Path, list[TensorEntry]] = defaultdict(list)
    for entry in entries:
        files[entry.file].append(entry)
    return files


def tensor_bytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * dtype.itemsize


def output_dtype(dtype: torch.dtype, target: torch.dtype) -> torch.dtype:
    return target if dtype.is_floating_point else dtype


def plan_shards(
    tensors: list[tuple[str, torch.dtype, tuple[int, ...]]], max_bytes: int
) -> list[list[tuple[str, torch.dtype, tuple[int, ...]]]]:
    """Split tensors, in order, into shards of at most `max_bytes` (a larger tensor gets a shard of its own)."""
    shards: list[list[tuple[str, torch.dtype, tuple[int, ...]]]] = []
    size = 0
    for item in tensors:
        nbytes = tensor_bytes(item[1], item[2])
        if not shards or (shards[-1] and size + nbytes > max_bytes):
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += nbytes
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


class ShardWriter:
    """Writes planned safetensors shards tensor by tensor, so no shard is ever assembled in memory."""

    def __init__(self, out_dir: Path, shards: list[list[tuple[str, torch.dtype, tuple[int, ...]]]]):
        self.paths = [out_dir / name for name in shard_names(len(shards))]
        self.shards = shards
        self.expected = iter([(i, item) for i, shard in enumerate(shards) for item in shard])
        self.file: BinaryIO | None = None
        self.open_index = -1

    def write(self, name: str, tensor: torch.Tensor) -> None:
        index, (planned, dtype, shape) = next(self.expected)
        if (name, tensor.dtype, tuple(tensor.shape)) != (planned, dtype, shape):
            raise RuntimeError(
                f"shard plan expected {planned} {dtype} {shape}, got {name} {tensor.dtype} {tensor.shape}"
            )
        if index != self.open_index:
            self._open(index)
        self.file.write(memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()))

    def _open(self, index: int) -> None:
        if self.file is not None:
            self.file.close()
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, dtype, shape in self.shards[index]:
            end = offset + tensor_bytes(dtype, shape)
            header[name] = {"dtype": SAFETENSORS_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
            offset = end
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
        self.file = open(self.paths[index], "wb")
        self.file.write(struct.pack("<Q", len(blob)) + blob)
        self.open_index = index

    def close(self) -> None:
        """Finish, then let the safetensors library itself confirm each shard holds exactly what was planned."""
        from safetensors import safe_open

        if next(self.expected, None) is not None or self.file is None:
            raise RuntimeError("shard plan not completed: a tensor was not written")
        self.file.close()
        for path, shard in zip(self.paths, self.shards, strict=True):
            with safe_open(path, framework="pt") as f:
                found = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
            if found != {name: tuple(shape) for name, _, shape in shard}:
                raise RuntimeError(f"{path.name} does not hold the planned tensors")


def max_shard_bytes(size: str | int) -> int:
    """merge.max_shard_size in bytes: '2GB' -> 2_000_000_000, '4GiB' -> 4 * 2**30, a plain number is bytes."""
    n = parse_size(size, bare_bytes=True)
    if n is None:
        raise UserError(f"merge.max_shard_size is '{size}', which is not a size; write e.g. 2GB, 500MB or 4GiB")
    return n


def write_model_files(base_dir: Path, adapter_dir: Path, out: Path, config: dict, dtype: str, shards) -> None:
    """config.json with the new dtype, the shard index, generation config and tokenizer files."""
    config = dict(config, dtype=dtype)
    if "torch_dtype" in config:  # written by transformers < 5
        config["torch_dtype"] = dtype
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if len(shards) > 1:
        names = shard_names(len(shards))
        index = {
            "metadata": {"total_size": sum(tensor_bytes(d, s) for shard in shards for _, d, s in shard)},
            "weight_map": {name: names[i] for i, shard in enumerate(shards) for name, _, _ in shard},
        }
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    copied = _copy_files(base_dir, out, code="auto_map" in config)
    if not any(name.startswith("tokenizer") for name in copied):
        # SFT may have saved the tokenizer beside the adapter only.
        copied += _copy_files(adapter_dir, out, tokenizer_only=True)
    if not any(name.startswith("tokenizer") for name in copied):
        print(f"note: no tokenizer files in {base_dir}; the merged model has none", flush=True)


TOKENIZER_FILES = {
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
}


def _copy_files(src: Path, dst: Path, tokenizer_only: bool = False, code: bool = False) -> list[str]:
    """Tokenizer files; unless tokenizer_only, the generation config too, and with `code` (a trust_remote_code
    model, whose config has an auto_map) its Python files."""
    copied = []
    for path in sorted(src.iterdir()):
        tokenizer = path.name.startswith("tokenizer") or path.name in TOKENIZER_FILES or path.suffix == ".tiktoken"
        other = path.name == "generation_config.json" or (code and path.suffix == ".py")
        if path.is_file() and (tokenizer or (other and not tokenizer_only)):
            shutil.copy2(path, dst / path.name)
            copied.append(path.name)
    return copied
