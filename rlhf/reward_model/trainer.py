"""The reward model's training loop: the merged model in k-bit, a LoRA adapter and an fp32 score head, the pairwise
loss on (chosen, rejected) pairs.

A small loop of our own rather than trl's RewardTrainer: that one wants an AutoModelForSequenceClassification (its
score head inside the model, saved as part of it), and under transformers' Trainer a wrapper module around our 8-bit
PEFT model would be checkpointed whole; here the model is the one PPO loads (`modeling.load_base` + our k-bit
preparation + `add_lora`), the score head is ours, and checkpoints are the RL steps' (`rlhf.rl.checkpoint`: adapter,
head, optimizer, state). What trl would have added is the loss, one line (`loss.pairwise_loss`).

Every step is a function of (seed, step): its pairs (a permutation per epoch), its dropout (seeded per step) and its
learning rate, so `--resume` from a checkpoint continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import math
import sys
import time

import torch
from torch import Tensor

from rlhf import modeling
from rlhf.chat import set_chat_template
from rlhf.config import Recipe
from rlhf.errors import UserError
from rlhf.reward_model.data import Pairs, load_pairs
from rlhf.reward_model.loss import pair_stats, pairwise_loss
from rlhf.rl import checkpoint, schedule
from rlhf.rl.reward import ScoreHead, sequence_scores
from rlhf.rl.telemetry import Log, peak_memory_bytes, progress
from rlhf.runs import Run


class NonFiniteLoss(RuntimeError):
    """The loss went NaN/inf: the run stops (exit 1) with its last good checkpoint on disk."""

    exit_code = 1


class RewardTrainer:
    name = "reward"  # in messages, as the RL trainers' names

    def __init__(self, recipe: Recipe, run: Run, out=None):
        self.recipe, self.run, self.cfg = recipe, run, recipe.reward_model
        self.out = out if out is not None else sys.stderr
        self.step = 0
        self.stop_requested = False
        self.log = Log(run.reward_dir, "reward", True)

    # --- setup ---
    def setup(self) -> None:
        cfg = self.cfg
        merged = self.run.merged
        self.tokenizer = modeling.load_tokenizer(merged, self.recipe.model.trust_remote_code)
        set_chat_template(self.tokenizer, self.recipe.model.chat_template)  # chat pairs: the run's own template
        # The data first: a bad pair fails in seconds, before the model loads.
        self.train_pairs, self.eval_pairs, self.preferences = load_pairs(cfg, self.tokenizer)
        if not len(self.eval_pairs):
            raise UserError(
                f"no held-out pair fits reward_model.max_length={cfg.max_length} tokens a side; raise it, or check "
                f"the split '{cfg.eval_split}'"
            )
        torch.manual_seed(cfg.seed)  # the adapter's and the head's initial weights
        model_cfg = self.recipe.model.model_copy(update={"name": str(merged.resolve())})
        base = modeling.load_base(model_cfg, merged)
        modeling.prepare_for_training(base, cfg.gradient_checkpointing)
        self.model = modeling.add_lora(base, cfg.lora)
        self.head = ScoreHead(base.config.hidden_size).to(modeling.device())
        self.params = [p for p in self.model.parameters() if p.requires_grad] + list(self.head.parameters())
        if cfg.optimizer == "adamw_8bit":
            import bitsandbytes as bnb

            self.optimizer = bnb.optim.AdamW8bit(self.params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        else:
            self.optimizer = torch.optim.AdamW(self.params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        per_step = cfg.batch_size * cfg.gradient_accumulation_steps
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(self.train_pairs) / per_step))

    # --- the schedule: functions of the step alone ---
    def lr_at(self, step: int) -> float:
        cfg = self.cfg
        return schedule.learning_rate(step, cfg.learning_rate, cfg.warmup_steps, cfg.lr_scheduler, self.total_steps)

    def step_pairs(self, step: int) -> list[list[int]]:
        cfg = self.cfg
        return schedule.step_pairs(
            step, len(self.train_pairs), cfg.batch_size, cfg.gradient_accumulation_steps, cfg.seed
        )

    def collate(self, pairs: Pairs, indices: list[int]) -> tuple[Tensor, Tensor]:
        """[2b, T] ids and mask: the b chosen sides, then the b rejected ones, right-padded, in one forward (LLM.int8
        picks its outlier columns per batch, so both sides of a pair see the same ones)."""
        seqs = [pairs.chosen[i] for i in indices] + [pairs.rejected[i] for i in indices]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, seq in enumerate(seqs):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        device = modeling.device()
        return ids.to(device), mask.to(device)

    def scores(self, pairs: Pairs, indices: list[int]) -> tuple[Tensor, Tensor]:
        ids, mask = self.collate(pairs, indices)
        scores = sequence_scores(self.model, self.head, ids, mask)
        return scores[: len(indices)], scores[len(indices) :]

    # --- one optimizer step ---
    def train_step(self) -> dict:
        cfg = self.cfg
        started = time.perf_counter()
        torch.manual_seed(cfg.seed * 1_000_003 + self.step)  # LoRA dropout: the same draws on a resumed run
        self.model.train()
        micro_batches = self.step_pairs(self.step)
        n_pairs = sum(len(m) for m in micro_batches)
        chosen, rejected, tokens = [], [], 0
        for indices in micro_batches:
            c, r = self.scores(self.train_pairs, indices)
            # Weighted by pairs, so the accumulated gradient is that of the mean loss over the whole step.
            loss = pairwise_loss(c, r, cfg.margin, cfg.score_penalty) * len(indices) / n_pairs
            loss.backward()
            chosen.append(c.detach())
            rejected.append(r.detach())
            tokens += sum(len(self.train_pairs.chosen[i]) + len(self.train_pairs.rejected[i]) for i in indices)
        chosen, rejected = torch.cat(chosen), torch.cat(rejected)
        loss_value = pairwise_loss(chosen, rejected, cfg.margin, cfg.score_penalty).item()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm))
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
            saved = checkpoint.saved_steps(self.run.reward_checkpoints)
            kept = f"the last checkpoint, {saved[-1]}, is kept" if saved else "no checkpoint was saved yet"
            raise NonFiniteLoss(
                f"the reward model's loss or gradient is not finite at step {self.step + 1} ({kept}); lower "
                f"reward_model.learning_rate, or add reward_model.score_penalty to keep the scores small"
            )
        lr = self.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        elapsed = time.perf_counter() - started
        stats = pair_stats(chosen, rejected)
        row = {
            "step": self.step,
            "loss": loss_value,
            "accuracy": stats["accuracy"],
            "margin_mean": stats["margin_mean"],
            "chosen_mean": stats["chosen_mean"],
            "rejected_mean": stats["rejected_mean"],
            "lr": lr,
            "grad_norm": grad_norm,
            "epoch": self.step * n_pairs / len(self.train_pairs),
            "tokens_per_s": tokens / elapsed,
            "peak_mem_bytes": peak_memory_bytes(),
            "time_step": elapsed,
        }
        self.log.metrics(row)
        return row

    def train(self) -> None:
        bar = self.bar = progress("reward", self.total_steps, self.step, True)
        while self.step < self.total_steps and not self.stop_requested:
            row = self.train_step()
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['accuracy']:.2f}")
            if self.step % self.cfg.save_steps == 0 or self.step == self.total_steps or self.stop_requested:
                self.save_checkpoint()
        bar.close()

    # --- evaluation ---
    @torch.no_grad()
    def held_out_scores(self) -> tuple[Tensor, Tensor]:
        """Scores of every held-out pair, in eval mode (no dropout), `batch_size` pairs a forward."""
        self.model.eval()
        chosen, rejected = [], []
        n = len(self.eval_pairs)
        for start in range(0, n, self.cfg.batch_size):
            c, r = self.scores(self.eval_pairs, list(range(start, min(start + self.cfg.batch_size, n))))
            chosen.append(c.float().cpu())
            rejected.append(r.float().cpu())
        self.model.train()
        return torch.cat(chosen), torch.cat(rejected)

    def evaluate(self) -> dict:
        chosen, rejected = self.held_out_scores()
        return pair_stats(chosen, rejected)

    # --- checkpoints ---
    def settings(self) -> dict:
        return {"reward_model": self.cfg.model_dump(mode="json"), "total_steps": self.total_steps}

    def _tensors(self) -> dict[str, dict[str, Tensor]]:
        from peft import get_peft_model_state_dict

        adapter = {k: v.detach().float() for k, v in get_peft_model_state_dict(self.model).items()}
        return {"adapter": adapter, "score_head": self.head.state_dict()}

    def save_checkpoint(self) -> None:
        checkpoint.save(
            self.run.reward_checkpoints, self.step, self._tensors(), self.optimizer, {"settings": self.settings()}
        )

    def load_checkpoint(self) -> dict:
        from peft import set_peft_model_state_dict

        checkpoint.remove_partial(self.run.reward_checkpoints, self.run.reward_dir / "adapter")
        tensors, optimizer, state = checkpoint.load_newest(
            self.run.reward_checkpoints,
            ("adapter", "score_head"),
            lambda m: print(f"reward: warning: {m}", file=self.out),
        )
        device = modeling.device()
        set_peft_model_state_dict(self.model, {k: v.to(device) for k, v in tensors["adapter"].items()})
        self.head.load_state_dict({k: v.to(device) for k, v in tensors["score_head"].items()})
        self.optimizer.load_state_dict(optimizer)
        self.step = int(state["step"])
        return state
