"""Step 1, `rlhf sft`: LoRA fine-tuning of an 8-bit (or 4-bit, or unquantized) base on a text dataset.

setup (recipe -> budget pre-flight -> model -> data) -> train (transformers' Trainer) -> save adapter -> report.
Trainer brings gradient accumulation, schedulers, checkpoints, resume, tensorboard/wandb and data-parallel training
under `accelerate launch`; the parts that are ours are the k-bit preparation, the data blocks and the run directory.
"""

from __future__ import annotations

import io
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rlhf import modeling
from rlhf.config import Recipe
from rlhf.data import load_sft_data, tokenize_blocks, tokenize_examples
from rlhf.errors import UserError
from rlhf.io import atomic_dir, atomic_write_text, read_jsonl, trim_jsonl
from rlhf.resolve import check_weights, resolve_model, resolve_tokenizer
from rlhf.runs import Run, mark_latest


@dataclass
class SftResult:
    run: Run
    adapter: Path
    steps: int
    final_loss: float
    seconds: float
    model: object = field(default=None, repr=False)  # the trained PEFT model, for callers that go on using it


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def check_run(run: Run, recipe: Recipe, resume: bool, force: bool) -> None:
    """Refuse to mix two runs in one directory. Writes nothing: a refused command leaves the disk as it was."""
    if run.root.exists() and not run.root.is_dir():
        raise UserError(f"--run {run.root} is a file; pass a directory (a new one, or a run to --resume)")
    if run.recipe_path.is_file() and not resume:
        done = any(p.exists() for p in (run.sft_dir, run.merged, run.ppo_dir))
        if done and not force:
            raise UserError(
                f"{run.root} already holds an SFT run{_of_recipe(run, recipe)}; pass --resume to continue it, "
                f"--force to start it again, or another --run DIR"
            )
    if resume:
        if not run.recipe_path.is_file():
            raise UserError(f"nothing to resume in {run.root}: it holds no run; drop --resume to start one")
        previous = run.load_recipe()
        if _without_layout(previous) != _without_layout(recipe):
            changed = [k for k in previous.model_fields if getattr(previous, k) != getattr(recipe, k)]
            raise UserError(
                f"--resume with a different recipe than {run.recipe_path} (sections differ: {', '.join(changed)}); "
                f"resume with the same recipe and overrides, or start a new --run"
            )


def _without_layout(recipe: Recipe) -> dict:
    """The recipe as training sees it: how a batch is split into micro-batches (what --auto-fit and an out-of-memory
    retry change) does not change the training, so a resume may differ in it."""
    sft = recipe.sft
    effective = sft.batch_size * sft.gradient_accumulation_steps
    return recipe.model_copy(
        update={"sft": sft.model_copy(update={"batch_size": effective, "gradient_accumulation_steps": 1})}
    ).model_dump()


def _of_recipe(run: Run, recipe: Recipe) -> str:
    """' of recipe 'X'' when the run in the directory was made by another recipe than this command's."""
    try:
        previous = run.load_recipe().name
    except UserError:
        return " (its recipe.yaml is unreadable)"
    return f" of recipe '{previous}' (this command's is '{recipe.name}')" if previous != recipe.name else ""


def start_run(run: Run, recipe: Recipe, resume: bool, force: bool) -> None:
    """Write the resolved recipe and point runs/latest here; with --force, clear the previous training state."""
    if is_main_process():
        run.root.mkdir(parents=True, exist_ok=True)
        if force and not resume:
            # Start training over, but keep the old adapter until the new one replaces it atomically.
            shutil.rmtree(run.sft_dir / "checkpoints", ignore_errors=True)
            (run.sft_dir / "metrics.jsonl").unlink(missing_ok=True)
        run.write_recipe(recipe, "sft")
        mark_latest(run)


def _metrics_callback(path: Path):
    from transformers import TrainerCallback

    class MetricsToJsonl(TrainerCallback):
        """One JSON row per logged step in RUN/sft/metrics.jsonl (the run-directory contract)."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs or "loss" not in logs:
                return
            row = {"step": state.global_step, "loss": float(logs["loss"]), "lr": float(logs.get("learning_rate", 0))}
            for key in ("grad_norm", "epoch"):
                if key in logs:
                    row[key] = float(logs[key])
            if torch.cuda.is_available():
                row["peak_mem_bytes"] = torch.cuda.max_memory_reserved()
            from rlhf.io import append_jsonl

            append_jsonl(path, row)

    return MetricsToJsonl()


def _progress_callback(tokens_per_step: float, vocab_size: int):
    """rlhf's own progress for SFT, as the RL steps show it: one bar (steps, loss, tokens/s, ETA) on rank 0, and a
    one-line hint when the loss stays above a uniform guess. It replaces transformers' printer, which prints each
    logged step as a quoted dictionary."""
    from transformers import TrainerCallback

    from rlhf.report import sft_loss_hint
    from rlhf.rl.telemetry import progress

    class Progress(TrainerCallback):
        bar = None
        hinted = False
        loss = rate = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.started, self.first = time.perf_counter(), state.global_step
            self.bar = progress("sft", state.max_steps, state.global_step, state.is_world_process_zero)

        def show(self) -> None:
            parts = [f"loss={self.loss:.4f}"] if self.loss is not None else []
            parts += [f"tok/s={self.rate:,.0f}"] if self.rate is not None else []
            self.bar.set_postfix_str(", ".join(parts), refresh=False)

        def on_step_end(self, args, state, control, **kwargs):
            seconds = time.perf_counter() - self.started
            if seconds > 0 and state.global_step > self.first:
                self.rate = tokens_per_step * (state.global_step - self.first) / seconds
            self.show()
            self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs or self.bar is None:
                return
            self.loss = float(logs["loss"])
            self.show()
            # After the first steps: a loss still above ln(vocabulary) learns nothing from its data.
            if not self.hinted and state.global_step >= min(10, max(1, state.max_steps // 3)):
                hint = sft_loss_hint(float(logs["loss"]), vocab_size)
                if hint and state.is_world_process_zero:
                    self.bar.write(f"sft: warning: {hint}", file=sys.stderr)
                self.hinted = bool(hint)

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.close()

    return Progress()


def _training_arguments(recipe: Recipe, run: Run):
    from transformers import TrainingArguments

    cfg = recipe.sft
    report_to = list(cfg.report_to)
    if "tensorboard" in report_to:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            report_to.remove("tensorboard")
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(run.sft_dir / "tensorboard")
    return TrainingArguments(
        output_dir=str(run.sft_dir / "checkpoints"),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_steps,
        lr_scheduler_type=cfg.lr_scheduler,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1,
        optim="adamw_bnb_8bit" if cfg.optimizer == "adamw_8bit" else "adamw_torch",
        max_grad_norm=cfg.max_grad_norm,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        report_to=report_to,
        seed=cfg.seed,
        use_cpu=not torch.cuda.is_available(),
        remove_unused_columns=False,
        dataloader_pin_memory=torch.cuda.is_available(),
        ddp_find_unused_parameters=False,
        disable_tqdm=True,  # rlhf's own bar (_progress_callback) instead
    )


def last_checkpoint(run: Run) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    folder = run.sft_dir / "checkpoints"
    return get_last_checkpoint(str(folder)) if folder.is_dir() else None


def run(recipe: Recipe, run: Run, resume: bool = False, force: bool = False, gpu: str | None = None) -> SftResult:
    started = time.time()
    checkpoint = None
    if resume:
        checkpoint = last_checkpoint(run)
        if checkpoint is None:
            raise UserError(f"--resume: no SFT checkpoint in {run.sft_dir / 'checkpoints'}; run without --resume")
    check_run(run, recipe, resume, force)
    if recipe.sft.optimizer == "adamw_8bit":
        modeling.require_bitsandbytes("sft.optimizer=adamw_8bit", "sft.optimizer=adamw")

    if Path(recipe.model.name).expanduser().exists():  # a local model that is no model is said as such, not sized
        check_weights(resolve_model(recipe.model.name, recipe.model.revision), recipe.model.name)

    # --- setup: data (the tokenizer alone, not the weights: the budget sizes pairs by their lengths) ---
    tokenizer = modeling.load_tokenizer(
        resolve_tokenizer(recipe.model.name, recipe.model.revision),
        recipe.model.trust_remote_code,
        recipe.model.chat_template,
    )
    data = load_sft_data(recipe.data, recipe.data.train_split)
    from rlhf import budget
    from rlhf.budget.lengths import sft_lengths

    lengths = None
    if data.format == "text":
        blocks = tokenize_blocks(data.rows, tokenizer, recipe.sft.block_size, recipe.sft.pack)
    else:
        blocks = tokenize_examples(data, tokenizer, recipe.sft.block_size)
        lengths = sft_lengths(blocks, recipe.sft.block_size, f"the longest of the {len(blocks)} examples")

    # Memory-budget pre-flight: before the model is loaded. One process prints it under `accelerate launch`.
    out = sys.stdout if is_main_process() else io.StringIO()
    budget.preflight(recipe, "sft", gpu=gpu, force=force, out=out, lengths=lengths)

    # --- setup: model ---
    # Seed before the adapter exists: peft draws LoRA A from the global RNG before Trainer seeds anything.
    from transformers import set_seed

    set_seed(recipe.sft.seed)
    model_dir = resolve_model(recipe.model.name, recipe.model.revision)
    base = modeling.load_base(recipe.model, model_dir)
    modeling.prepare_for_training(base, recipe.sft.gradient_checkpointing)
    model = modeling.add_lora(base, recipe.lora)
    targets = modeling.adapter_targets(model)
    # Only now, with the model, data and adapter known to work, does the run directory change.
    start_run(run, recipe, resume, force)
    trainable, total = modeling.count_parameters(model)
    if is_main_process():
        print(
            f"sft: {recipe.model.name} ({recipe.model.quantization}), LoRA r={recipe.lora.rank} on "
            f"{','.join(targets)}: {trainable:,} trainable of {total:,} parameters; {_data_line(data.format, blocks)}",
            file=sys.stderr,
        )

    # --- train ---
    import datasets
    from transformers import DataCollatorForSeq2Seq, Trainer, default_data_collator

    train_set = datasets.Dataset.from_dict(
        {"input_ids": blocks.input_ids, "attention_mask": blocks.attention_mask, "labels": blocks.labels}
    )
    if data.format == "text":
        collator = default_data_collator  # blocks are all block_size long
    else:
        # Task examples vary in length: pad each batch to its longest (labels with -100), on the right, where the
        # attention mask hides the padding and the positions of the real tokens stay 0..n-1.
        tokenizer.padding_side = "right"
        collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)
    metrics_path = run.sft_dir / "metrics.jsonl"
    if is_main_process():
        _trim_metrics(metrics_path, checkpoint)
    trainer = Trainer(
        model=model,
        args=_training_arguments(recipe, run),
        train_dataset=train_set,
        data_collator=collator,
        callbacks=[_metrics_callback(metrics_path)],
    )
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for printer in (PrinterCallback, ProgressCallback):  # quoted loss dictionaries: the bar below shows the loss
        trainer.remove_callback(printer)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    filled = sum(map(sum, blocks.attention_mask)) / max(1, len(blocks))  # tokens a block: padding is no work done
    per_step = filled * recipe.sft.batch_size * recipe.sft.gradient_accumulation_steps * world
    trainer.add_callback(_progress_callback(per_step, base.config.vocab_size))
    output = trainer.train(resume_from_checkpoint=checkpoint)

    # --- save ---
    adapter_dir = run.sft_adapter
    if trainer.is_world_process_zero():
        with atomic_dir(adapter_dir) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            atomic_write_text(tmp / "README.md", _adapter_card(recipe, targets, output.global_step, data.format))
    rows = read_jsonl(metrics_path)
    final_loss = rows[-1]["loss"] if rows else float(output.training_loss)
    if not math.isfinite(final_loss):
        raise UserError(
            "SFT loss is not finite; likely causes: a learning rate too high, "
            "or fp16 overflow — try sft.learning_rate lower or model.dtype=bfloat16"
        )
    seconds = time.time() - started
    if is_main_process():
        print(
            f"sft: done in {seconds:.0f}s, {output.global_step} steps, final loss {final_loss:.4f}; "
            f"adapter: {adapter_dir}"
        )
    return SftResult(run, adapter_dir, output.global_step, final_loss, seconds, model)


def _data_line(fmt: str, blocks) -> str:
    if fmt == "text":
        return f"{len(blocks)} blocks of {max(map(len, blocks.input_ids))} tokens from {blocks.n_documents} documents"
    counted = sum(lab != -100 for labels in blocks.labels for lab in labels[1:])
    total = sum(map(len, blocks.input_ids))
    dropped = f", {blocks.n_dropped} dropped (nothing to learn within sft.block_size)" if blocks.n_dropped else ""
    return (
        f"{len(blocks)} {fmt} examples of up to {max(map(len, blocks.input_ids))} tokens{dropped}; the loss counts "
        f"{counted:,} of their {total:,} tokens ({'completions' if fmt == 'prompt-completion' else 'assistant turns'})"
    )


def _trim_metrics(path: Path, checkpoint: str | None) -> None:
    """On resume keep the rows up to the checkpoint's step, so every step is logged exactly once; else start empty."""
    trim_jsonl(path, int(Path(checkpoint).name.split("-")[-1]) if checkpoint else 0)


def _data_columns(recipe: Recipe, fmt: str) -> str:
    if fmt == "text":
        return f"column `{recipe.data.text_column}`"
    what = "`prompt` + `completion`" if fmt == "prompt-completion" else "`messages`"
    return f"{what}, loss on the {'completion' if fmt == 'prompt-completion' else 'assistant'} tokens only"


def _adapter_card(recipe: Recipe, targets: list[str], steps: int, fmt: str) -> str:
    return (
        f"# LoRA adapter (rlhf sft)\n\n"
        f"- base model: {recipe.model.name} ({recipe.model.quantization})\n"
        f"- data: {recipe.data.dataset} [{recipe.data.train_split}], {_data_columns(recipe, fmt)}\n"
        f"- LoRA: r={recipe.lora.rank}, alpha={recipe.lora.alpha}, dropout={recipe.lora.dropout}, "
        f"targets {', '.join(targets)}\n"
        f"- steps: {steps}, block size {recipe.sft.block_size}, learning rate {recipe.sft.learning_rate}\n"
        f"- date: {time.strftime('%Y-%m-%d')}\n\n"
        f"Load with `PeftModel.from_pretrained(base, this_dir)`; merge with `rlhf merge`.\n"
    )
