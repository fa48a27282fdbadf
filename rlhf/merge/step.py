"""Step 2, `rlhf merge`: the SFT adapter added into the fp16 base, one tensor in RAM at a time.

1. check the arguments and the run; a merge already done (same fingerprint) says so, unless --force
2. predict the RAM and disk it needs (rlhf.merge.ram) and refuse what does not fit (exit 3)
3. stream: read each base tensor (io), add scaling x B @ A where the adapter targets it (W + s.BA in fp32), check it
   against peft's own delta (verify), write it to its shard
4. probe the logits of merged vs base + adapter when the model fits in RAM; write the card and merge.json
5. rename the finished directory into place: a reader sees no merged model or the whole one
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psutil
import torch
from tqdm.auto import tqdm

from rlhf.config import ModelConfig
from rlhf.dtypes import torch_dtype
from rlhf.errors import UserError
from rlhf.io import atomic_dir
from rlhf.memory import peak_rss_bytes, release_freed_memory
from rlhf.merge.adapters import (
    MergePlan,
    Target,
    adapter_config,
    check_adapter_base,
    check_supported,
    plan_merge,
    read_adapter,
)
from rlhf.merge.card import model_card
from rlhf.merge.combine import METHODS, combine_adapters
from rlhf.merge.io import (
    ShardWriter,
    group_by_file,
    max_shard_bytes,
    output_dtype,
    plan_shards,
    tensor_bytes,
    write_model_files,
)
from rlhf.merge.nf4 import nf4_round_trip, quantized_weight_names
from rlhf.merge.ram import check_fits, predict_peak_ram
from rlhf.merge.verify import MergeCheckFailed, PeftReference, check_rounding, probe_logits
from rlhf.resolve import resolve_model
from rlhf.runs import Run, existing_run
from rlhf.tensorfiles import TensorEntry, checkpoint_entries, read_tensor
from rlhf.units import format_bytes

OUTPUT_DTYPES = ("float16", "bfloat16")  # what merge writes (merge.dtype)
RECORD = "merge.json"  # written into the merged dir: what was merged, and the checks' numbers


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


def run(
    run_dir: str | None = None,
    dtype: str | None = None,
    force: bool = False,
    adapters: list[str] | None = None,
    weights: list[float] | None = None,
    method: str = "linear",
    density: float = 0.5,
    base_weights: str | None = None,
) -> MergeResult:
    """Merge RUN/sft/adapter (or several adapters, combined by peft) into the recipe's base model: RUN/merged."""
    start = time.perf_counter()
    training_run = existing_run(run_dir, "merge")
    recipe = training_run.load_recipe()
    dtype = dtype or recipe.merge.dtype
    base_weights = base_weights or recipe.merge.base_weights
    if base_weights == "dequantized" and recipe.model.quantization != "4bit":
        raise UserError(
            f"merge.base_weights=dequantized merges into the NF4-dequantized weights a 4-bit sft trained on, but this "
            f"run's sft used model.quantization={recipe.model.quantization}; use merge.base_weights=original"
        )
    adapter_dirs, weights = _check_args(training_run, dtype, adapters, weights, method, density)
    for adapter_dir in adapter_dirs:
        check_supported(adapter_dir, adapter_config(adapter_dir))

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
            **({"base_weights": base_weights} if base_weights != "original" else {}),
        },
    )
    if training_run.merged.exists() and not force:
        return _already_merged(training_run.merged, fingerprint, start)

    base_dir = resolve_model(recipe.model.name, recipe.model.revision)
    for adapter_dir in adapter_dirs:
        check_adapter_base(adapter_dir, recipe.model.name, base_dir)

    provenance = {
        "base_model": recipe.model.name,
        "revision": recipe.model.revision,
        "adapters": [str(d) for d in adapter_dirs],
        "weights": weights if combined else None,
        "method": method if combined else None,
        "recipe": str(training_run.recipe_path),
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
        base_weights=base_weights,
        trained=recipe.model if recipe.model.quantization == "4bit" else None,
    )
    if not combined:
        return merge_checkpoint(base_dir, adapter_dirs[0], training_run.merged, **options)
    with tempfile.TemporaryDirectory(prefix="rlhf-combined-") as tmp:
        adapter = combine_adapters(adapter_dirs, weights, method, Path(tmp), density=density)
        return merge_checkpoint(base_dir, adapter, training_run.merged, **options)


def _check_args(
    training_run: Run, dtype: str, adapters: list[str] | None, weights: list[float] | None, method: str, density: float
) -> tuple[list[Path], list[float]]:
    problems = []
    if dtype not in OUTPUT_DTYPES:
        problems.append(f"--dtype is '{dtype}'; use one of {', '.join(OUTPUT_DTYPES)}")
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
        if not (training_run.sft_adapter / "adapter_config.json").is_file():
            raise UserError(
                f"no SFT adapter in {training_run.root} ({training_run.sft_adapter} is missing); run `rlhf sft` first"
            )
        return [training_run.sft_adapter], [1.0]
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
    print(f"{out_dir} is already merged from this adapter (pass --force to merge again)", flush=True)
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
    base_weights: str = "original",
    trained: ModelConfig | None = None,
) -> MergeResult:
    """Merge one LoRA adapter into a safetensors checkpoint, streaming, and write a HF model dir to `out_dir`.

    `out_dir` appears only when everything is written and checked (it replaces an existing one). `probe`: None runs
    the logit probe when the fp32 model takes under 1/4 of the available RAM. `force` skips the RAM and disk check.
    `trained`: the model settings of a 4-bit training run; with `base_weights="dequantized"` every weight that run
    quantized is first rounded through NF4, and the probe also compares with the 4-bit base + adapter it trained.
    """
    start = time.perf_counter()
    base_dir, adapter_dir, out_dir = Path(base_dir), Path(adapter_dir), Path(out_dir)
    if dtype not in OUTPUT_DTYPES:
        raise UserError(f"dtype is '{dtype}'; use one of {', '.join(OUTPUT_DTYPES)}")
    target_dtype = torch_dtype(dtype)
    config = json.loads((base_dir / "config.json").read_text())
    entries = checkpoint_entries(base_dir)
    check_not_quantized(base_dir, config, entries)
    adapter = read_adapter(adapter_dir)
    plan = plan_merge(entries, adapter, config)
    rounded: set[str] = set()
    if base_weights == "dequantized":
        if trained is None:
            raise UserError("base_weights='dequantized' needs the 4-bit training run's model settings (trained=)")
        rounded = quantized_weight_names(base_dir, entries, trust_remote_code)

    outputs = [(e.name, output_dtype(e.dtype, target_dtype), e.shape) for e in entries]
    shards = plan_shards(outputs, max_shard_bytes(max_shard_size))
    out_bytes = sum(tensor_bytes(d, s) for _, d, s in outputs)
    params = sum(e.numel for e in entries if e.dtype.is_floating_point)
    predicted = predict_peak_ram(entries, plan, target_dtype, adapter.nbytes, rounded)
    print(
        f"merge {adapter_dir} into {base_dir}: {len(entries)} tensors ({len(plan.targets)} LoRA targets) in "
        f"{len(group_by_file(entries))} shard(s), {_count(params)} parameters -> {dtype}, {len(shards)} shard(s) "
        f"of at most {max_shard_size}"
        + (f"; into the NF4-dequantized weights of {len(rounded)} quantized layers" if rounded else ""),
        flush=True,
    )
    check_fits(predicted, out_bytes, out_dir, entries, adapter.nbytes, force)
    skipped = "turned off"
    if probe is None:
        available = psutil.virtual_memory().available
        probe = 4 * params < available / 4
        skipped = f"the fp32 model, {format_bytes(4 * params)}, is over 1/4 of the available {format_bytes(available)}"

    reference = PeftReference(adapter)
    with atomic_dir(out_dir) as tmp:
        load_dtype = torch_dtype(trained.dtype) if trained is not None else target_dtype
        writer = ShardWriter(tmp, shards)
        max_diff = _stream(entries, plan, reference, writer, target_dtype, progress, rounded, load_dtype)
        stream_peak = peak_rss_bytes()
        print(
            f"weights: max |merged - (base + peft delta)| = {max_diff:.3g}, each within one {dtype} rounding step",
            flush=True,
        )
        write_model_files(base_dir, adapter_dir, tmp, config, dtype, shards)

        logits_diff = None
        probes: dict[str, float] = {}
        if probe:
            probes = probe_logits(base_dir, adapter_dir, tmp, trust_remote_code, trained, target_dtype)
            # The check is against the weights merged into: the original ones, or the 4-bit model as trained.
            logits_diff = probes["trained" if rounded else "original"]
            against = "4-bit base + adapter, as trained" if rounded else "base + adapter"
            print(f"logits: max |merged - ({against})| = {logits_diff:.3g} (tolerance {tolerance:g})", flush=True)
            if "trained" in probes and not rounded:
                print(
                    f"logits: max |merged - (4-bit base + adapter, as trained)| = {probes['trained']:.3g} "
                    f"(merge.base_weights=dequantized merges into the weights it trained on)",
                    flush=True,
                )
            if not logits_diff <= tolerance:
                raise MergeCheckFailed(
                    f"merged logits differ from {against} logits by up to {logits_diff:.4g}, over the "
                    f"tolerance {tolerance:g} (merge.tolerance); nothing was written to {out_dir}"
                )
        else:
            print(
                f"logits: probe not run ({skipped}); the in-stream check above still compared every tensor", flush=True
            )

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
        record["base_weights"] = base_weights
        record["nf4_rounded_tensors"] = len(rounded)
        # Both probes, whichever was checked: docs/memory.md compares the two choices with these numbers.
        record["max_abs_diff_logits_vs_original"] = probes.get("original")
        record["max_abs_diff_logits_vs_trained"] = probes.get("trained")
        record.setdefault("adapters", [str(adapter_dir)])
        record["date"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")
        (tmp / "README.md").write_text(model_card(record, adapter.config, tolerance))
    print(
        f"wrote {out_dir} in {result.seconds:.1f} s; peak RSS {format_bytes(result.peak_rss_bytes)} "
        f"(merge {format_bytes(stream_peak)}, predicted {format_bytes(predicted)})",
        flush=True,
    )
    return result


def _record_fields(result: MergeResult) -> dict[str, Any]:
    fields = dataclasses.asdict(result)
    fields.pop("output_dir")
    fields.pop("already_merged")
    return fields


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


def _stream(
    entries,
    plan: MergePlan,
    reference: PeftReference,
    writer: ShardWriter,
    dtype,
    progress: bool,
    rounded: set[str] = frozenset(),
    load_dtype=torch.float32,
) -> float:
    """Read each base tensor (those in `rounded` through NF4), merge or cast it, check it, write it; returns the
    largest weight difference."""
    max_diff = 0.0
    files = group_by_file(entries)
    desc = f"merge: shard 1/{len(files)}"  # labelled from its first draw, not only after the first shard opens
    with tqdm(total=sum(e.nbytes for e in entries), unit="B", unit_scale=True, disable=not progress, desc=desc) as bar:
        for number, (path, group) in enumerate(files.items(), 1):
            bar.set_description(f"merge: shard {number}/{len(files)}")
            with open(path, "rb", buffering=0) as f:
                for entry in group:
                    tensor = plan.replacements.get(entry.name)
                    if tensor is None:
                        tensor = read_tensor(f, entry)
                    if entry.name in rounded:
                        tensor = nf4_round_trip(tensor, load_dtype)
                    if entry.name in plan.targets:
                        target = plan.targets[entry.name]
                        out, diff = merge_lora_weight(tensor, target, reference.delta(target.module), dtype)
                    elif entry.name in plan.bias_targets:
                        target = plan.bias_targets[entry.name]
                        out, diff = merge_lora_bias(tensor, target, reference.bias_delta(target.module), dtype)
                    else:
                        out, diff = tensor.to(output_dtype(tensor.dtype, dtype)), 0.0
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
    return out, check_rounding(target.key, out, reference, merged, dtype, target.rank)


def merge_lora_bias(bias: torch.Tensor, target: Target, peft_delta: torch.Tensor, dtype) -> tuple[torch.Tensor, float]:
    """b + scaling * lora_B.bias (peft's lora_bias=True), in fp32; checked like the weights."""
    merged = bias.to(torch.float32, copy=True)
    reference = peft_delta.add_(merged)
    merged.add_(target.lora_b_bias.float(), alpha=target.scaling)
    out = merged.to(dtype)
    return out, check_rounding(target.bias_key, out, reference, merged, dtype, 1)


def _count(n: int) -> str:
    power = min(int(math.log(max(n, 1), 1000)), 4)
    return f"{n / 1000**power:.3g}{('', ' K', ' M', ' B', ' T')[power]}"
