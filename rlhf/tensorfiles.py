"""Safetensors checkpoints read without holding a shard: the headers of a single-file or sharded checkpoint, and one
tensor at a time (merge reads weights this way; the reward model fingerprints a base from the headers)."""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from rlhf.errors import UserError

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor in a safetensors file: where its bytes are, and what they are."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute offset in the file
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: Path) -> list[TensorEntry]:
    """The tensors of one safetensors file, in file order (8-byte header length, JSON header, then the data)."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    entries = []
    for name, info in header.items():
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise UserError(f"{path}: tensor {name} has dtype {info['dtype']}, which rlhf merge cannot read")
        begin, end = info["data_offsets"]
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        entries.append(TensorEntry(name, path, dtype, tuple(info["shape"]), 8 + length + begin, end - begin))
    return sorted(entries, key=lambda e: e.start)


def read_tensor(f: BinaryIO, entry: TensorEntry) -> torch.Tensor:
    """Read one tensor straight into its own buffer: plain reads, no mmap, so a shard never sits in our RSS."""
    buffer = torch.empty(entry.nbytes, dtype=torch.uint8)
    view = memoryview(buffer.numpy())
    f.seek(entry.start)
    done = 0
    while done < entry.nbytes:
        n = f.readinto(view[done:])
        if not n:
            raise UserError(f"{entry.file} is truncated (tensor {entry.name}); download the checkpoint again")
        done += n
    return buffer.view(entry.dtype).reshape(entry.shape)


def checkpoint_entries(base_dir: Path) -> list[TensorEntry]:
    """Every tensor of a single-file or sharded safetensors checkpoint, shard by shard in file order."""
    index = base_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (base_dir / "model.safetensors").is_file():
        names = ["model.safetensors"]
    else:
        raise UserError(
            f"{base_dir} has no safetensors weights (model.safetensors or model.safetensors.index.json); "
            f"rlhf merge reads safetensors only: convert the checkpoint once with save_pretrained"
        )
    entries = [entry for name in names for entry in read_header(base_dir / name)]
    seen: set[str] = set()
    for entry in entries:
        if entry.name in seen:
            raise UserError(f"{base_dir}: tensor {entry.name} appears in two shards; the checkpoint is broken")
        seen.add(entry.name)
    return entries
