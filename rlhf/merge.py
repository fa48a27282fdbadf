"""`rlhf merge`: add the SFT LoRA into the original base weights, one tensor at a time, and prove every merge.

peft's `merge_and_unload` needs the whole model in RAM (41 GB at fp16 for gpt-neox-20b). Here the base checkpoint is
read tensor by tensor from its safetensors files and written tensor by tensor into new shards whose headers are
planned up front, so the peak is about the largest tensor's working set plus the adapter — not the model, not a shard:

    LoRA target:    W' = W + scaling * B @ A     (in fp32, cast to the output dtype)
    anything else:  W' = W                       (floating tensors cast to the output dtype)

Every merged tensor is checked in-stream against peft's own `get_delta_weight` for that layer — a peft LoRA layer built
around a zero-cost stand-in for the base Linear — so a wrong scaling, transpose or key mapping is caught by code that
is not ours. A model small enough for RAM also gets a logit probe: merged model against the fp32 base + adapter.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import hashlib
import json
import math
import re
import resource
import shutil
import struct
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

import psutil
import torch
from torch import nn
from tqdm.auto import tqdm

from rlhf.errors import DoesNotFit, UserError
from rlhf.io import atomic_dir
from rlhf.resolve import looks_like_hub_id, resolve_model
from rlhf.runs import Run, existing_run

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
METHODS = ("linear", "cat", "ties", "dare_ties")
RECORD = "merge.json"  # written into the merged dir: what was merged, and the checks' numbers
PEFT_PREFIX = "base_model.model."
PROBE_SHAPE = (2, 16)  # random token ids for the logit probe: batch, length


class MergeCheckFailed(Exception):
    """The merged weights or logits differ from base + adapter by more than allowed; nothing was written."""

    exit_code = 1


@dataclass
class MergeResult:
    output_dir: Path
    max_abs_diff_weights: float
    max_abs_diff_logits: float | None  # None: the probe did not run (model too large for RAM, or turned off)
    peak_rss_bytes: int  # process peak, the probe included
    seconds: float
    already_merged: bool = False
    dtype: str = "float16"
    stream_peak_rss_bytes: int = 0  # process peak when the last shard was written, before the probe
    predicted_peak_bytes: int = 0
    shards: int = 0
    tensors: int = 0
    merged_tensors: int = 0


# --- entry point for `rlhf merge` -------------------------------------------------------------------------------


def run(
    run_dir: str | None = None,
    dtype: str | None = None,
    force: bool = False,
    adapters: list[str] | None = None,
    weights: list[float] | None = None,
    method: str = "linear",
    density: float = 0.5,
) -> MergeResult:
    """Merge RUN/sft/adapter (or several adapters, combined by peft) into the recipe's base model: RUN/merged."""
    start = time.perf_counter()
    run_ = existing_run(run_dir, "merge")
    recipe = run_.load_recipe()
    dtype = dtype or recipe.merge.dtype
    adapter_dirs, weights = _check_args(run_, dtype, adapters, weights, method, density)
    for adapter_dir in adapter_dirs:
        check_supported(adapter_dir, _adapter_config(adapter_dir))

    combined = len(adapter_dirs) > 1
    fingerprint = _fingerprint(
        adapter_dirs,
        {
            "model": recipe.model.name,
            "revision": recipe.model.revision,
            "dtype": dtype,
            "weights": weights if combined else None,
            "method": method if combined else None,
            "density": density if combined and method in ("ties", "dare_ties") else None,
        },
    )
    if run_.merged.exists() and not force:
        return _already_merged(run_.merged, fingerprint, start)

    base_dir = resolve_model(recipe.model.name, recipe.model.revision)
    for adapter_dir in adapter_dirs:
        check_adapter_base(adapter_dir, recipe.model.name, base_dir)

    provenance = {
        "base_model": recipe.model.name,
        "revision": recipe.model.revision,
        "adapters": [str(d) for d in adapter_dirs],
        "weights": weights if combined else None,
        "method": method if combined else None,
        "recipe": str(run_.recipe_path),
        "recipe_yaml": recipe.to_yaml(),
        "data": f"{recipe.data.dataset} (split {recipe.data.train_split}, column {recipe.data.text_column})",
        "fingerprint": fingerprint,
    }
    options = dict(
        dtype=dtype,
        max_shard_size=recipe.merge.max_shard_size,
        tolerance=recipe.merge.tolerance,
        force=force,
        trust_remote_code=recipe.model.trust_remote_code,
        provenance=provenance,
    )
    if not combined:
        return merge_checkpoint(base_dir, adapter_dirs[0], run_.merged, **options)
    with tempfile.TemporaryDirectory(prefix="rlhf-combined-") as tmp:
        adapter = combine_adapters(adapter_dirs, weights, method, Path(tmp), density=density)
        return merge_checkpoint(base_dir, adapter, run_.merged, **options)


def _check_args(
    run_: Run, dtype: str, adapters: list[str] | None, weights: list[float] | None, method: str, density: float
) -> tuple[list[Path], list[float]]:
    problems = []
    if dtype not in DTYPES:
        problems.append(f"--dtype is '{dtype}'; use one of {', '.join(DTYPES)}")
    if method not in METHODS:
        problems.append(f"--method is '{method}'; use one of {', '.join(METHODS)}")
    if not 0 < density <= 1:
        problems.append(f"density is {density}; it must be in (0, 1]")
    if weights is not None and not adapters:
        problems.append("--weights needs --adapters: name the adapters the weights are for")
    if adapters and weights is None and len(adapters) > 1:
        problems.append(f"--adapters names {len(adapters)} adapters; give as many --weights, e.g. --weights 0.5 0.5")
    if adapters and weights is not None and len(weights) != len(adapters):
        problems.append(f"{len(adapters)} adapters but {len(weights)} weights; give one weight per adapter")
    if problems:
        raise UserError("; ".join(problems))

    if not adapters:
        if not (run_.sft_adapter / "adapter_config.json").is_file():
            raise UserError(f"no SFT adapter in {run_.root} ({run_.sft_adapter} is missing); run `rlhf sft` first")
        return [run_.sft_adapter], [1.0]
    adapter_dirs = [Path(a).expanduser() for a in adapters]
    for adapter_dir in adapter_dirs:
        if not (adapter_dir / "adapter_config.json").is_file():
            raise UserError(f"adapter '{adapter_dir}' is not a PEFT adapter directory (no adapter_config.json)")
    return adapter_dirs, list(weights) if weights is not None else [1.0]


def _already_merged(out_dir: Path, fingerprint: str, start: float) -> MergeResult:
    record_path = out_dir / RECORD
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    if record.get("fingerprint") != fingerprint:
        raise UserError(
            f"{out_dir} exists but was not merged from this adapter, base and dtype; pass --force to merge again"
        )
    _say(f"{out_dir} is already merged from this adapter (pass --force to merge again)")
    return MergeResult(
        output_dir=out_dir,
        max_abs_diff_weights=record["max_abs_diff_weights"],
        max_abs_diff_logits=record["max_abs_diff_logits"],
        peak_rss_bytes=peak_rss_bytes(),
        seconds=time.perf_counter() - start,
        already_merged=True,
        dtype=record["dtype"],
        shards=record["shards"],
        tensors=record["tensors"],
        merged_tensors=record["merged_tensors"],
    )


def _fingerprint(adapter_dirs: list[Path], settings: dict[str, Any]) -> str:
    """Identifies a merge's inputs: the adapter files' bytes and the settings that change the result."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for adapter_dir in adapter_dirs:
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            with open(adapter_dir / name, "rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
    return digest.hexdigest()


def check_adapter_base(adapter_dir: Path, model_name: str, base_dir: Path) -> None:
    """The adapter must have been trained on the recipe's model: same name, same resolved path, or same hub repo."""
    trained_on = _adapter_config(adapter_dir).get("base_model_name_or_path")
    if not trained_on:
        _say(f"note: {adapter_dir} does not record its base model; assuming {model_name}")
        return
    if trained_on.rstrip("/") == model_name.rstrip("/"):
        return
    trained_path = Path(trained_on).expanduser()
    if trained_path.exists() and trained_path.resolve() == base_dir.resolve():
        return
    # A hub id on one side and a path into the hub cache (models--org--name/snapshots/...) on the other.
    for hub_id, path in ((model_name, trained_on), (trained_on, str(base_dir))):
        if looks_like_hub_id(hub_id) and f"models--{hub_id.replace('/', '--')}" in path:
            return
    raise UserError(
        f"adapter {adapter_dir} was trained on '{trained_on}', but the recipe's model is '{model_name}' "
        f"({base_dir}); merge it into its own base: fix model.name in the run's recipe.yaml or pass another adapter"
    )


# --- the streaming merge ----------------------------------------------------------------------------------------


def merge_checkpoint(
    base_dir: Path | str,
    adapter_dir: Path | str,
    out_dir: Path | str,
    dtype: str = "float16",
    max_shard_size: str | int = "2GB",
    *,
    tolerance: float = 5e-2,
    probe: bool | None = None,
    force: bool = False,
    trust_remote_code: bool = False,
    provenance: dict[str, Any] | None = None,
    progress: bool = True,
) -> MergeResult:
    """Merge one LoRA adapter into a safetensors checkpoint, streaming, and write a HF model dir to `out_dir`.

    `out_dir` appears only when everything is written and checked (it replaces an existing one). `probe`: None runs
    the logit probe when the fp32 model takes under 1/4 of the available RAM. `force` skips the RAM and disk check.
    """
    start = time.perf_counter()
    base_dir, adapter_dir, out_dir = Path(base_dir), Path(adapter_dir), Path(out_dir)
    if dtype not in DTYPES:
        raise UserError(f"dtype is '{dtype}'; use one of {', '.join(DTYPES)}")
    target_dtype = DTYPES[dtype]
    config = json.loads((base_dir / "config.json").read_text())
    entries = checkpoint_entries(base_dir)
    check_not_quantized(base_dir, config, entries)
    adapter = read_adapter(adapter_dir)
    plan = plan_merge(entries, adapter, config)

    outputs = [(e.name, _output_dtype(e.dtype, target_dtype), e.shape) for e in entries]
    shards = plan_shards(outputs, parse_size(max_shard_size))
    out_bytes = sum(_nbytes(d, s) for _, d, s in outputs)
    params = sum(e.numel for e in entries if e.dtype.is_floating_point)
    predicted = predict_peak_ram(entries, plan, target_dtype, adapter.nbytes)
    _say(
        f"merge {adapter_dir} into {base_dir}: {len(entries)} tensors ({len(plan.targets)} LoRA targets) in "
        f"{len(_files(entries))} shard(s), {_count(params)} parameters -> {dtype}, {len(shards)} shard(s) "
        f"of at most {max_shard_size}"
    )
    check_fits(predicted, out_bytes, out_dir, entries, adapter.nbytes, force)
    skipped = "turned off"
    if probe is None:
        available = psutil.virtual_memory().available
        probe = 4 * params < available / 4
        skipped = f"the fp32 model, {_size(4 * params)}, is over 1/4 of the available {_size(available)}"

    reference = PeftReference(adapter)
    with atomic_dir(out_dir) as tmp:
        max_diff = _stream(entries, plan, reference, ShardWriter(tmp, shards), target_dtype, progress)
        stream_peak = peak_rss_bytes()
        _say(f"weights: max |merged - (base + peft delta)| = {max_diff:.3g}, each within one {dtype} rounding step")
        _write_model_files(base_dir, adapter_dir, tmp, config, dtype, shards)

        logits_diff = None
        if probe:
            logits_diff = probe_logits(base_dir, adapter_dir, tmp, trust_remote_code)
            _say(f"logits: max |merged - (base + adapter)| = {logits_diff:.3g} (tolerance {tolerance:g})")
            if not logits_diff <= tolerance:
                raise MergeCheckFailed(
                    f"merged logits differ from base + adapter logits by up to {logits_diff:.4g}, over the "
                    f"tolerance {tolerance:g} (merge.tolerance); nothing was written to {out_dir}"
                )
        else:
            _say(f"logits: probe not run ({skipped}); the in-stream check above still compared every tensor")

        result = MergeResult(
            output_dir=out_dir,
            max_abs_diff_weights=max_diff,
            max_abs_diff_logits=logits_diff,
            peak_rss_bytes=peak_rss_bytes(),
            seconds=time.perf_counter() - start,
            dtype=dtype,
            stream_peak_rss_bytes=stream_peak,
            predicted_peak_bytes=predicted,
            shards=len(shards),
            tensors=len(entries),
            merged_tensors=len(plan.targets),
        )
        record = {**(provenance or {}), **_record_fields(result), "base_dir": str(base_dir)}
        record.setdefault("adapters", [str(adapter_dir)])
        record["date"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")
        (tmp / "README.md").write_text(model_card(record, adapter.config, tolerance))
    _say(
        f"wrote {out_dir} in {result.seconds:.1f} s; peak RSS {_size(result.peak_rss_bytes)} "
        f"(merge {_size(stream_peak)}, predicted {_size(predicted)})"
    )
    return result


def _record_fields(result: MergeResult) -> dict[str, Any]:
    fields = dataclasses.asdict(result)
    fields.pop("output_dir")
    fields.pop("already_merged")
    return fields


def _stream(entries, plan: MergePlan, reference: PeftReference, writer: ShardWriter, dtype, progress: bool) -> float:
    """Read each base tensor, merge or cast it, check it, write it; returns the largest weight difference."""
    max_diff = 0.0
    files = _files(entries)
    with tqdm(total=sum(e.nbytes for e in entries), unit="B", unit_scale=True, disable=not progress) as bar:
        for number, (path, group) in enumerate(files.items(), 1):
            bar.set_description(f"shard {number}/{len(files)}")
            with open(path, "rb", buffering=0) as f:
                for entry in group:
                    tensor = plan.replacements.get(entry.name)
                    if tensor is None:
                        tensor = read_tensor(f, entry)
                    if entry.name in plan.targets:
                        target = plan.targets[entry.name]
                        out, diff = merge_lora_weight(tensor, target, reference.delta(target.module), dtype)
                    elif entry.name in plan.bias_targets:
                        target = plan.bias_targets[entry.name]
                        out, diff = merge_lora_bias(tensor, target, reference.bias_delta(target.module), dtype)
                    else:
                        out, diff = tensor.to(_output_dtype(tensor.dtype, dtype)), 0.0
                    max_diff = max(max_diff, diff)
                    writer.write(entry.name, out)
                    del tensor, out  # one tensor in memory at a time
                    release_freed_memory()
                    bar.update(entry.nbytes)
    writer.close()
    return max_diff


def merge_lora_weight(
    weight: torch.Tensor, target: Target, peft_delta: torch.Tensor, dtype
) -> tuple[torch.Tensor, float]:
    """W + scaling * B @ A, computed in fp32 and cast to `dtype`; checked against W + peft's delta for the layer.

    Memory: peft's delta (fp32, becomes the reference in place), one fp32 copy of W (becomes the merge, then the
    error, in place), the output: 12 bytes an element for an fp16 base, no other full-size temporaries.
    """
    merged = weight.to(torch.float32, copy=True)
    reference = peft_delta.add_(merged)
    a, b = target.lora_a.float(), target.lora_b.float()
    if target.transposed:  # Conv1D (fan_in_fan_out) and embeddings store the weight as (in, out)
        merged.addmm_(a.T, b.T, alpha=target.scaling)
    else:
        merged.addmm_(b, a, alpha=target.scaling)
    out = merged.to(dtype)
    return out, _check_rounding(target.key, out, reference, merged, dtype, target.rank)


def merge_lora_bias(bias: torch.Tensor, target: Target, peft_delta: torch.Tensor, dtype) -> tuple[torch.Tensor, float]:
    """b + scaling * lora_B.bias (peft's lora_bias=True), in fp32; checked like the weights."""
    merged = bias.to(torch.float32, copy=True)
    reference = peft_delta.add_(merged)
    merged.add_(target.lora_b_bias.float(), alpha=target.scaling)
    out = merged.to(dtype)
    return out, _check_rounding(target.bias_key, out, reference, merged, dtype, 1)


def _check_rounding(name: str, out: torch.Tensor, ref: torch.Tensor, scratch: torch.Tensor, dtype, rank: int) -> float:
    """Every element of `out` must be within one `dtype` rounding step of peft's fp32 result `ref`.

    Rounding the fp32 result costs at most half a step; the slack covers fp32 noise (summation order in B @ A).
    A wrong scaling, a transposed delta or a delta added to the wrong layer is far outside this. `ref` and
    `scratch` (fp32, same shape) are overwritten in place: no full-size temporaries.
    """
    if not out.numel():
        return 0.0
    error = scratch.copy_(out).sub_(ref).abs_()
    max_error = float(error.max())
    lo, hi = ref.aminmax()
    finfo = torch.finfo(dtype)
    slack = finfo.eps * finfo.tiny + 8 * (rank + 1) * torch.finfo(torch.float32).eps * max(-float(lo), float(hi))
    excess = float(error.sub_(ref.abs_().mul_(finfo.eps).add_(slack)).max())  # max(error - allowed)
    if not excess <= 0:  # NaN fails too
        raise MergeCheckFailed(
            f"merged tensor {name} differs from the base plus peft's own delta by up to {max_error:.4g} "
            f"({excess:.3g} beyond one {str(dtype).removeprefix('torch.')} rounding step); the merge is wrong "
            f"and nothing was written"
        )
    return max_error


# --- reading safetensors without holding a shard ----------------------------------------------------------------

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


def _files(entries: list[TensorEntry]) -> dict[Path, list[TensorEntry]]:
    files: dict[Path, list[TensorEntry]] = defaultdict(list)
    for entry in entries:
        files[entry.file].append(entry)
    return files


def check_not_quantized(base_dir: Path, config: dict[str, Any], entries: list[TensorEntry]) -> None:
    """Merging into quantized weights damages the model (peft #638): only the original checkpoint will do."""
    quantization = config.get("quantization_config")
    integer = [e.name for e in entries if e.name.endswith(".weight") and e.dtype in (torch.int8, torch.uint8)]
    if quantization:
        what = f"{quantization.get('quant_method', 'quantized')}: config.json has quantization_config"
    elif integer:
        what = f"integer weights such as {integer[0]}"
    else:
        return
    raise UserError(
        f"the base model {base_dir} is quantized ({what}); merging into quantized weights damages the model: "
        f"set model.name to the original fp16/bf16/fp32 checkpoint"
    )


# --- writing shards whose headers are planned up front ----------------------------------------------------------


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * dtype.itemsize


def _output_dtype(dtype: torch.dtype, target: torch.dtype) -> torch.dtype:
    return target if dtype.is_floating_point else dtype


def plan_shards(
    tensors: list[tuple[str, torch.dtype, tuple[int, ...]]], max_bytes: int
) -> list[list[tuple[str, torch.dtype, tuple[int, ...]]]]:
    """Split tensors, in order, into shards of at most `max_bytes` (a larger tensor gets a shard of its own)."""
    shards: list[list[tuple[str, torch.dtype, tuple[int, ...]]]] = []
    size = 0
    for item in tensors:
        nbytes = _nbytes(item[1], item[2])
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
            end = offset + _nbytes(dtype, shape)
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


def parse_size(size: str | int) -> int:
    """'2GB' -> 2_000_000_000 (decimal, as transformers' max_shard_size), '4GiB' -> 4 * 2**30."""
    if isinstance(size, int):
        return size
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    units |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", size)
    if not match or match.group(2).upper() not in units or float(match.group(1)) <= 0:
        raise UserError(f"merge.max_shard_size is '{size}', which is not a size; write e.g. 2GB, 500MB or 4GiB")
    return int(float(match.group(1)) * units[match.group(2).upper()])


def _write_model_files(base_dir: Path, adapter_dir: Path, out: Path, config: dict, dtype: str, shards) -> None:
    """config.json with the new dtype, the shard index, generation config and tokenizer files."""
    config = dict(config, dtype=dtype)
    if "torch_dtype" in config:  # written by transformers < 5
        config["torch_dtype"] = dtype
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if len(shards) > 1:
        names = shard_names(len(shards))
        index = {
            "metadata": {"total_size": sum(_nbytes(d, s) for shard in shards for _, d, s in shard)},
            "weight_map": {name: names[i] for i, shard in enumerate(shards) for name, _, _ in shard},
        }
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    copied = _copy_files(base_dir, out, code="auto_map" in config)
    if not any(name.startswith("tokenizer") for name in copied):
        # SFT may have saved the tokenizer beside the adapter only.
        copied += _copy_files(adapter_dir, out, tokenizer_only=True)
    if not any(name.startswith("tokenizer") for name in copied):
        _say(f"note: no tokenizer files in {base_dir}; the merged model has none")


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


# --- the adapter, and where each of its tensors goes in the base ------------------------------------------------

LORA_KEY = re.compile(r"(?P<module>.+)\.(?P<part>lora_A|lora_B)\.(?P<param>weight|bias)")
EMBEDDING_KEY = re.compile(r"(?P<module>.+)\.lora_embedding_(?P<part>A|B)")
# Initialisations that change the base weights during training (W_res = W - B A): the adapter is only valid with the
# changed base, which the checkpoint does not have.
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


@dataclass
class LoraPair:
    a: torch.Tensor | None = None
    b: torch.Tensor | None = None
    b_bias: torch.Tensor | None = None
    embedding: bool = False


@dataclass
class Adapter:
    dir: Path
    config: dict[str, Any]
    pairs: dict[str, LoraPair]  # peft's module name (no base_model.model. prefix) -> its LoRA tensors
    full: dict[str, torch.Tensor]  # tensors saved whole (bias="all", modules_to_save): they replace the base's
    nbytes: int


def _adapter_config(adapter_dir: Path) -> dict[str, Any]:
    path = adapter_dir / "adapter_config.json"
    if not path.is_file():
        raise UserError(f"{adapter_dir} is not a PEFT adapter (no adapter_config.json)")
    return json.loads(path.read_text())


def check_supported(adapter_dir: Path, config: dict[str, Any]) -> None:
    """Refuse adapters whose merge is not W + scaling * B @ A on the original base, naming the setting."""
    from peft import LoraConfig

    if config.get("peft_type") != "LORA":
        raise UserError(f"{adapter_dir} is a {config.get('peft_type')} adapter; rlhf merge merges LoRA adapters only")
    if config.get("use_dora"):
        raise UserError(
            f"{adapter_dir} is a DoRA adapter (use_dora: true): its magnitude vector rescales whole weights, which "
            f"rlhf merge does not merge exactly; train a plain LoRA (use_dora false)"
        )
    # peft tags every LoRA variant (VeLoRA, aLoRA, Arrow, ...) in LoraConfig's field metadata.
    variants = [f.name for f in dataclasses.fields(LoraConfig) if f.metadata.get("is_lora_variant")]
    unsupported = [*variants, "layer_replication", "target_parameters", "trainable_token_indices", "use_qalora"]
    for name in unsupported:
        if config.get(name):
            raise UserError(
                f"{adapter_dir} uses {name} = {config[name]!r}, which rlhf merge cannot merge exactly into the base "
                f"weights; train a plain LoRA"
            )
    init = config.get("init_lora_weights")
    init_variants = next(f for f in dataclasses.fields(LoraConfig) if f.name == "init_lora_weights").metadata
    if isinstance(init, str) and (init.startswith(BASE_CHANGING_INITS) or init in init_variants["lora_variants"]):
        raise UserError(
            f"{adapter_dir} was initialised with init_lora_weights = '{init}', which changes the base weights during "
            f"training; the original checkpoint plus this adapter is not the trained model, so it cannot be merged"
        )


def read_adapter(adapter_dir: Path) -> Adapter:
    config = _adapter_config(adapter_dir)
    check_supported(adapter_dir, config)
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise UserError(f"{adapter_dir} has no adapter_model.safetensors; save the adapter with safetensors")
    from safetensors.torch import load_file

    state = load_file(weights)
    pairs: dict[str, LoraPair] = defaultdict(LoraPair)
    full: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        name = key.removeprefix(PEFT_PREFIX)
        if match := LORA_KEY.fullmatch(name):
            pair = pairs[match["module"]]
            if match["param"] == "bias":
                pair.b_bias = tensor
            else:
                setattr(pair, match["part"][-1].lower(), tensor)
        elif match := EMBEDDING_KEY.fullmatch(name):
            pair = pairs[match["module"]]
            pair.embedding = True
            setattr(pair, match["part"].lower(), tensor)
        elif "lora_" in name:
            raise UserError(f"{adapter_dir}: tensor {key} is not a LoRA A/B matrix; rlhf merge cannot merge it")
        else:
            full[name.replace(".base_layer.", ".")] = tensor
    for module, pair in pairs.items():
        if pair.a is None or pair.b is None or pair.a.shape[0] != pair.b.shape[1]:
            raise UserError(f"{adapter_dir}: layer {module} lacks a matching lora_A/lora_B pair; the adapter is broken")
    return Adapter(adapter_dir, config, dict(pairs), full, sum(t.numel() * t.element_size() for t in state.values()))


def lora_scaling(config: dict[str, Any], module: str, rank: int) -> float:
    """alpha / r, or alpha / sqrt(r) with rsLoRA; alpha_pattern keys match the end of the module name, as in peft."""
    alpha = config["lora_alpha"]
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = value
            break
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


@dataclass
class Target:
    module: str  # peft's name for the layer
    key: str  # the checkpoint's name for its weight
    bias_key: str | None  # ... and for its bias, when the adapter has lora_B biases (lora_bias=True)
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    lora_b_bias: torch.Tensor | None
    scaling: float
    transposed: bool  # the weight is stored (in, out): Conv1D with fan_in_fan_out, or an embedding

    @property
    def rank(self) -> int:
        return self.lora_a.shape[0]


@dataclass
class MergePlan:
    targets: dict[str, Target]  # checkpoint weight key -> its LoRA
    bias_targets: dict[str, Target]  # checkpoint bias key -> its LoRA
    replacements: dict[str, torch.Tensor]  # checkpoint key -> tensor saved in the adapter


def plan_merge(entries: list[TensorEntry], adapter: Adapter, config: dict[str, Any]) -> MergePlan:
    """Find the base tensor for every adapter tensor; any adapter tensor without one is an error."""
    keys = KeyMap([e.name for e in entries], config)
    shapes = {e.name: e.shape for e in entries}
    fan_in_fan_out = bool(adapter.config.get("fan_in_fan_out"))
    plan = MergePlan({}, {}, {})
    missing = []
    for module, pair in adapter.pairs.items():
        key = keys.find(f"{module}.weight")
        if key is None:
            missing.append(f"{module}.weight")
            continue
        transposed = fan_in_fan_out or pair.embedding
        expected = (pair.a.shape[1], pair.b.shape[0]) if transposed else (pair.b.shape[0], pair.a.shape[1])
        if shapes[key] != expected:
            raise UserError(
                f"adapter layer {module} makes a {expected} update but the base tensor {key} is {shapes[key]}: "
                f"the adapter was trained on another model"
            )
        bias_key = None
        if pair.b_bias is not None:
            bias_key = keys.find(f"{module}.bias")
            if bias_key is None:
                missing.append(f"{module}.bias")
                continue
        scaling = lora_scaling(adapter.config, module, pair.a.shape[0])
        target = Target(module, key, bias_key, pair.a, pair.b, pair.b_bias, scaling, transposed)
        plan.targets[key] = target
        if bias_key is not None:
            plan.bias_targets[bias_key] = target
    for name, tensor in adapter.full.items():
        key = keys.find(name)
        if key is None:
            missing.append(name)
        elif shapes[key] != tuple(tensor.shape):
            raise UserError(f"adapter tensor {name} is {tuple(tensor.shape)} but base tensor {key} is {shapes[key]}")
        else:
            plan.replacements[key] = tensor
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise UserError(
            f"adapter {adapter.dir} has tensors for {shown}, which the base checkpoint does not have: "
            f"the adapter was trained on another model"
        )
    return plan


class KeyMap:
    """Finds the checkpoint tensor for a name as peft saw it during training.

    Names may differ by a prefix (a checkpoint saved from the bare model has `layers.0...`, peft saw
    `gpt_neox.layers.0...`, or the other way round) and by transformers' load-time renames (GPT-NeoX's checkpoint
    `embed_out` is the model's `lm_head`), so a name matches exactly, or else by a unique dotted suffix.
    """

    def __init__(self, checkpoint_keys: list[str], config: dict[str, Any]):
        renames = _checkpoint_renames(config)
        self.to_checkpoint: dict[str, str] = {key: key for key in checkpoint_keys}
        for key in checkpoint_keys:
            renamed = key
            for rename in renames:
                renamed, _ = rename.rename_source_key(renamed)
            self.to_checkpoint.setdefault(renamed, key)
        self.by_tail: dict[str, list[str]] = defaultdict(list)
        for name in self.to_checkpoint:
            self.by_tail[self._tail(name)].append(name)

    @staticmethod
    def _tail(name: str) -> str:
        return ".".join(name.split(".")[-2:])

    def find(self, name: str) -> str | None:
        if name in self.to_checkpoint:
            return self.to_checkpoint[name]
        hits = {
            self.to_checkpoint[candidate]
            for candidate in self.by_tail[self._tail(name)]
            if candidate.endswith("." + name) or name.endswith("." + candidate)
        }
        if len(hits) > 1:
            raise UserError(f"adapter tensor {name} matches several base tensors ({', '.join(sorted(hits))})")
        return hits.pop() if hits else None


def _checkpoint_renames(config: dict[str, Any]) -> list:
    """transformers' own checkpoint -> model key renames for this architecture (plain renames only)."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import WeightRenaming

    found = None
    for name in [*(config.get("architectures") or []), config.get("model_type")]:
        if name and (found := get_checkpoint_conversion_mapping(name)) is not None:
            break
    return [t for t in found or [] if type(t) is WeightRenaming]


# --- peft's own delta, the reference for the in-stream check ----------------------------------------------------


def _skeleton(pairs: dict[str, LoraPair], fan_in_fan_out: bool, biased: set[str]) -> nn.Module:
    """A module tree holding, at peft's names, stand-ins for the targeted layers: right shapes, no memory.

    The weights are one fp32 zero broadcast to full size; fp32 so that peft, which casts the adapter to the base
    layer's dtype, keeps the adapter's own precision.
    """
    from transformers.pytorch_utils import Conv1D

    def free(*shape: int) -> nn.Parameter:
        return nn.Parameter(torch.zeros((), dtype=torch.float32).expand(*shape), requires_grad=False)

    root = nn.Module()
    for module, pair in pairs.items():
        n_in, n_out = pair.a.shape[1], pair.b.shape[0]
        with torch.device("meta"):
            if pair.embedding:
                layer = nn.Embedding(n_in, n_out)
            elif fan_in_fan_out:
                layer = Conv1D(n_out, n_in)
            else:
                layer = nn.Linear(n_in, n_out)
        layer.weight = free(*layer.weight.shape)
        if hasattr(layer, "bias"):  # real zeros: peft may load a saved base bias into it
            layer.bias = nn.Parameter(torch.zeros(n_out), requires_grad=False) if module in biased else None
        parent = root
        *path, leaf = module.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, layer)
    return root


def _load_into(model, adapter_dir: Path, name: str) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    # LoRA tensors only: whole saved tensors (a base_layer.weight) would not fit the skeleton's zero-cost stand-ins.
    state = {k: v for k, v in load_file(adapter_dir / "adapter_model.safetensors").items() if "lora_" in k}
    result = set_peft_model_state_dict(model, state, adapter_name=name)
    missing = [k for k in result.missing_keys if "lora_" in k and f".{name}." in k]
    if missing:
        raise UserError(f"peft could not load {adapter_dir} ({missing[0]} missing); the adapter is broken")


def _peft_config(adapter_dir: Path):
    """The adapter's config for loading into a skeleton: no initialisation (the weights are loaded next)."""
    from peft import LoraConfig

    config = LoraConfig.from_pretrained(adapter_dir)
    config.init_lora_weights = False
    config.modules_to_save = None  # whole tensors are merged by plan_merge, not by the skeleton
    config.inference_mode = True
    return config


def peft_skeleton(adapters: dict[str, Adapter]):
    """A PeftModel over a skeleton, with each adapter loaded by peft itself under its given name."""
    from peft import PeftModel

    pairs: dict[str, LoraPair] = {}
    for adapter in adapters.values():
        for module, pair in adapter.pairs.items():
            known = pairs.setdefault(module, pair)
            if (known.a.shape[1], known.b.shape[0]) != (pair.a.shape[1], pair.b.shape[0]):
                raise UserError(f"the adapters disagree on the shape of layer {module}: they are for different models")
    fan_in_fan_out = {bool(a.config.get("fan_in_fan_out")) for a in adapters.values()}
    if len(fan_in_fan_out) > 1:
        raise UserError("the adapters disagree on fan_in_fan_out: they are for different models")
    biased = {m for a in adapters.values() for m, p in a.pairs.items() if p.b_bias is not None}
    root = _skeleton(pairs, fan_in_fan_out.pop(), biased)
    model = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns about a model without a config: the skeleton has none
        for name, adapter in adapters.items():
            if model is None:
                model = PeftModel(root, _peft_config(adapter.dir), adapter_name=name)
            else:
                model.add_adapter(name, _peft_config(adapter.dir))
            _load_into(model, adapter.dir, name)
    return model


class PeftReference:
    """peft's delta for each layer of one adapter: the in-stream check's reference, independent of our arithmetic."""

    def __init__(self, adapter: Adapter):
        self.model = peft_skeleton({"default": adapter})

    def _layer(self, module: str):
        from peft.tuners.lora import LoraLayer

        layer = self.model.base_model.model.get_submodule(module)
        if not isinstance(layer, LoraLayer):
            raise UserError(f"peft does not put a LoRA layer at {module} for this adapter's target_modules")
        return layer

    @torch.no_grad()
    def delta(self, module: str) -> torch.Tensor:
        """The fp32 update peft adds to the layer's weight (a fresh tensor: the caller may overwrite it)."""
        return self._layer(module).get_delta_weight("default").to(torch.float32)

    @torch.no_grad()
    def bias_delta(self, module: str) -> torch.Tensor:
        layer = self._layer(module)
        return (layer.lora_B["default"].bias * layer.scaling["default"]).to(torch.float32)


# --- several adapters -------------------------------------------------------------------------------------------


def combine_adapters(
    adapter_dirs: list[Path], weights: list[float], method: str, out_dir: Path, density: float = 0.5
) -> Path:
    """Combine LoRA adapters with peft's add_weighted_adapter, on a skeleton (no base weights), and save the result.

    Returns the combined adapter's directory, ready for merge_checkpoint.
    """
    if len(adapter_dirs) != len(weights):
        raise UserError(f"{len(adapter_dirs)} adapters but {len(weights)} weights; give one weight per adapter")
    if method not in METHODS:
        raise UserError(f"method is '{method}'; use one of {', '.join(METHODS)}")
    names = [f"adapter{i}" for i in range(len(adapter_dirs))]
    model = peft_skeleton({name: read_adapter(Path(d)) for name, d in zip(names, adapter_dirs, strict=True)})
    torch.manual_seed(0)  # dare_ties drops entries at random: the same inputs give the same merge
    try:
        model.add_weighted_adapter(
            names,
            list(weights),
            "combined",
            combination_type=method,
            density=density if method in ("ties", "dare_ties") else None,
        )
    except ValueError as exc:
        hint = "; adapters of different ranks combine with --method cat" if "same r" in str(exc) else ""
        raise UserError(f"peft cannot combine the adapters with --method {method}: {exc}{hint}") from None
    model.save_pretrained(out_dir, selected_adapters=["combined"])
    combined = out_dir / "combined"
    config = json.loads((combined / "adapter_config.json").read_text())
    # peft folds each adapter's scaling into the combined A and B and sets lora_alpha = r, so the combined scaling
    # must be 1; it copies use_rslora from the first adapter, which would make it sqrt(r).
    config["use_rslora"] = False
    (combined / "adapter_config.json").write_text(json.dumps(config, indent=2))
    _say(f"combined {len(adapter_dirs)} adapters with peft ({method}, weights {list(weights)})")
    return combined


# --- the logit probe --------------------------------------------------------------------------------------------


@torch.no_grad()
def probe_logits(base_dir: Path, adapter_dir: Path, merged_dir: Path, trust_remote_code: bool = False) -> float:
    """max |logits(merged) - logits(fp32 base + adapter, by peft)| on random token ids; also checks strict loading.

    One model in memory at a time: the reference's logits are kept, the reference is freed, then the merged is loaded.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    def load(path: Path):
        with _no_progress_bars():
            return AutoModelForCausalLM.from_pretrained(
                path, dtype=torch.float32, output_loading_info=True, trust_remote_code=trust_remote_code
            )

    base, base_info = load(base_dir)
    vocab = base.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, PROBE_SHAPE, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft calls a transformers API deprecated for v6
        expected = PeftModel.from_pretrained(base, adapter_dir).eval()(input_ids=ids).logits
    del base

    merged, info = load(merged_dir)
    for kind in ("missing_keys", "unexpected_keys"):
        extra = set(info[kind]) - set(base_info[kind])
        if extra:
            raise MergeCheckFailed(
                f"the merged model does not load cleanly ({kind.replace('_', ' ')}: {', '.join(sorted(extra)[:3])})"
            )
    return float((merged.eval()(input_ids=ids).logits - expected).abs().max())


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """transformers' "Loading weights" bars would bury the merge's own report."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


# --- memory, disk, report ---------------------------------------------------------------------------------------


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc
    except AttributeError:  # macOS, musl: nothing to call
        return None


_MALLOC_TRIM = _malloc_trim()


def release_freed_memory() -> None:
    """Give freed heap pages back to the OS. glibc keeps freed blocks under 32 MB for reuse; with tensors of many
    sizes they fragment, and the process would creep up by ~100 MB over a 1 B-parameter merge."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def predict_peak_ram(entries: list[TensorEntry], plan: MergePlan, dtype: torch.dtype, adapter_bytes: int) -> int:
    """This process now, plus the adapter twice (ours and peft's copy), plus the largest one-tensor working set.

    A LoRA target holds the base tensor, two fp32 tensors and the output (merge_lora_weight): 12 bytes an element
    for an fp16 base. Any other tensor: its input, and its output when the dtype changes.
    """
    largest = 0
    for entry in entries:
        out = entry.numel * _output_dtype(entry.dtype, dtype).itemsize
        if entry.name in plan.targets or entry.name in plan.bias_targets:
            need = entry.nbytes + 8 * entry.numel + out
        else:
            need = entry.nbytes + (out if entry.dtype != _output_dtype(entry.dtype, dtype) else 0)
        largest = max(largest, need)
    return psutil.Process().memory_info().rss + 2 * adapter_bytes + largest


def check_fits(
    predicted: int, out_bytes: int, out_dir: Path, entries: list[TensorEntry], adapter_bytes: int, force: bool
) -> None:
    """Print the RAM and disk the merge needs; raise DoesNotFit when this machine lacks them (unless force)."""
    now = psutil.Process().memory_info().rss
    available = psutil.virtual_memory().available
    existing = next(p for p in [out_dir, *out_dir.parents] if p.exists())
    free_disk = shutil.disk_usage(existing).free
    largest_shard = max(sum(e.nbytes for e in group) for group in _files(entries).values())
    report = (
        f"  RAM:  predicted peak {_size(predicted)} (this process {_size(now)}, adapter {_size(adapter_bytes)}, "
        f"one tensor at a time; largest input shard {_size(largest_shard)}); available {_size(available)}\n"
        f"  disk: {_size(out_bytes)} for the merged shards in {out_dir.parent}; free {_size(free_disk)}"
    )
    _say(report)
    problems = []
    if predicted - now > available:
        problems.append(f"about {_size(predicted - now)} more RAM than the {_size(available)} available")
    if out_bytes > free_disk:
        problems.append(f"{_size(out_bytes)} of disk but {out_dir.parent} has {_size(free_disk)} free")
    if problems and not force:
        raise DoesNotFit(f"the merge needs {' and '.join(problems)}; free some, or pass --force to try anyway", report)


def model_card(record: dict[str, Any], adapter_config: dict[str, Any], tolerance: float) -> str:
    base = record.get("base_model") or record["base_dir"]
    adapters = ", ".join(f"`{a}`" for a in record["adapters"])
    if record.get("weights"):
        adapters += f" combined by peft ({record['method']}, weights {record['weights']})"
    revision = f" @ {record['revision']}" if record.get("revision") else ""
    targets = adapter_config.get("target_modules")
    targets = ", ".join(sorted(targets)) if isinstance(targets, list) else targets
    logits = record["max_abs_diff_logits"]
    logits = f"{logits:.3g} (tolerance {tolerance:g})" if logits is not None else "not run (model too large for RAM)"
    rows = [
        ("Base model", f"`{base}`{revision}, read from `{record['base_dir']}` at its original precision"),
        (
            "Adapter",
            f"{adapters} (LoRA r={adapter_config.get('r')}, alpha={adapter_config.get('lora_alpha')}, "
            f"targets {targets})",
        ),
        ("Recipe", f"`{record['recipe']}`" if record.get("recipe") else "none (merged with merge_checkpoint)"),
        ("Data", record.get("data") or "not recorded"),
        ("Merged on", record["date"]),
        ("dtype", record["dtype"]),
        (
            "Check: weights",
            f"max abs(merged - (base + peft delta)) = {record['max_abs_diff_weights']:.3g}, "
            f"every element within one {record['dtype']} rounding step",
        ),
        ("Check: logits", f"max abs(merged - (fp32 base + adapter)) = {logits}"),
    ]
    lines = [
        "---",
        f"base_model: {base}",
        "library_name: transformers",
        "tags: [rlhf, lora, merged]",
        "---",
        "",
        f"# {base} + LoRA, merged",
        "",
        f"The LoRA adapter added into the weights of `{base}` by `rlhf merge` (W + scaling * B A, computed in fp32, "
        f"streamed one tensor at a time) and saved at {record['dtype']}. Load it like any model:",
        "`AutoModelForCausalLM.from_pretrained(path)`.",
        "",
        "| | |",
        "|---|---|",
        *(f"| {key} | {value} |" for key, value in rows),
    ]
    if record.get("recipe_yaml"):
        lines += ["", "## Recipe", "", "```yaml", record["recipe_yaml"].rstrip(), "```"]
    return "\n".join(lines) + "\n"


def _size(n: float) -> str:
    power = min(int(math.log(max(abs(n), 1), 1024)), 4)
    return f"{n / 1024**power:.2f} {('B', 'KiB', 'MiB', 'GiB', 'TiB')[power]}"


def _count(n: int) -> str:
    power = min(int(math.log(max(n, 1), 1000)), 4)
    return f"{n / 1000**power:.3g}{('', ' K', ' M', ' B', ' T')[power]}"


def _say(message: str) -> None:
    print(message, flush=True)
