"""DPO's training loop: the merged model in k-bit with a new LoRA as the policy, the same model with that adapter
disabled as the reference, the DPO loss on (chosen, rejected) pairs.

Our own loop on the project's pieces rather than trl 1.16's DPOTrainer, which takes the same PEFT model and uses the
same disabled-adapter reference: that trainer is a transformers Trainer, and rlhf's contracts are not its. Its
checkpoints are written in place (a kill -9 mid-save leaves a half-written checkpoint-N that resume then reads), its
data order and dropout on resume are those of the Trainer's sampler state, its output directory is its own; the
budget pre-flight and the run directory would have to wrap around it. The loop here is the one `rlhf reward` keeps:
every step a function of (seed, step) (`rlhf.rl.schedule`), checkpoints in one rename (`rlhf.rl.checkpoint`), the
log-probs through `rlhf.rl.policy.Policy` (only the answer positions' logits, fp32 log-softmax in chunks), the 8-bit
model loaded by `rlhf.modeling`. What trl would have added is the loss (`rlhf.dpo.loss`); tests/test_dpo.py shows the
loss, implicit rewards and gradients equal trl's DPOTrainer's on the same model and pairs.
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
from rlhf.data import load_texts
from rlhf.dpo.data import PreferencePairs, load_pairs
from rlhf.dpo.loss import dpo_losses, kl_proxy, reward_stats
from rlhf.errors import UserError
from rlhf.reward_model.trainer import NonFiniteLoss
from rlhf.rl import checkpoint, schedule
from rlhf.rl.policy import Policy, disable_dropout
from rlhf.rl.telemetry import Log, peak_memory_bytes, progress
from rlhf.runs import Run


class DpoTrainer:
    name = "dpo"  # in messages, as the other trainers' names

    def __init__(self, recipe: Recipe, run: Run, out=None):
        self.recipe, self.run, self.cfg = recipe, run, recipe.dpo
        self.out = out if out is not None else sys.stderr
        self.step = 0
        self.stop_requested = False
        self.log = Log(run.dpo_dir, "dpo", True)

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
                f"no held-out pair fits dpo.max_length={cfg.max_length} tokens a side; raise it, or check the split "
                f"'{cfg.eval_split}'"
            )
        if cfg.judge:
            from rlhf.rewards import load_spec

            load_spec(cfg.judge)  # an unknown judge fails now, before the model loads
        torch.manual_seed(cfg.seed)  # the adapter's initial weights
        model_cfg = self.recipe.model.model_copy(update={"name": str(merged.resolve())})
        base = modeling.load_base(model_cfg, merged)
        # Dropout in the model itself would make the reference pass (adapter off) a random sample; the adapter's own
        # dropout (dpo.lora.dropout) is added after this and acts on the policy only, seeded per step.
        disable_dropout(base)
        modeling.prepare_for_training(base, cfg.gradient_checkpointing)
        self.model = modeling.add_lora(base, cfg.lora)
        self.policy = Policy(self.model)  # temperature 1: DPO's log-probs are the model's own
        self.params = self.policy.trainable_parameters()
        if cfg.optimizer == "adamw_8bit":
            import bitsandbytes as bnb

            self.optimizer = bnb.optim.AdamW8bit(self.params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        else:
            self.optimizer = torch.optim.AdamW(self.params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        per_step = cfg.batch_size * cfg.gradient_accumulation_steps
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(self.train_pairs) / per_step))
        self.judge = None
        if cfg.judge and cfg.eval_prompts:
            self._setup_judged_eval()

    def _setup_judged_eval(self) -> None:
        """Held-out prompts from the run's data (as `rlhf ppo` draws its eval prompts) and the judge's reward."""
        from rlhf.rewards import load_reward
        from rlhf.rl.prompts import Prompts

        cfg, data = self.cfg, self.recipe.data
        self.judge = load_reward(cfg.judge)
        try:
            held_out = load_texts(data, data.eval_split, min_chars=cfg.prompt_min_chars)
            self.eval_source = data.eval_split
        except UserError:
            held_out = load_texts(data, data.train_split, min_chars=cfg.prompt_min_chars)[-cfg.eval_prompts :]
            self.eval_source = f"{data.train_split} (last {len(held_out)})"
        self.eval_texts = held_out[: cfg.eval_prompts]
        self.eval_prompts = Prompts(
            self.eval_texts, self.tokenizer, cfg.prompt_min_tokens, cfg.prompt_max_tokens, cfg.seed + 1
        )
        gen = cfg.generation
        self.gen_policy = self.policy if gen.temperature == 1.0 else Policy(self.model, None, gen.temperature)

    # --- the schedule: functions of the step alone ---
    def lr_at(self, step: int) -> float:
        cfg = self.cfg
        return schedule.learning_rate(step, cfg.learning_rate, cfg.warmup_steps, cfg.lr_scheduler, self.total_steps)

    def step_pairs(self, step: int) -> list[list[int]]:
        cfg = self.cfg
        n = len(self.train_pairs)
        return schedule.step_pairs(step, n, cfg.batch_size, cfg.gradient_accumulation_steps, cfg.seed)

    # --- the passes ---
    def collate(self, pairs: PreferencePairs, indices: list[int]) -> tuple[Tensor, Tensor, Tensor, int]:
        """[2b, T] ids, attention mask and answer mask (the b chosen sides, then the b rejected ones, right-padded, in
        one forward: LLM.int8 picks its outlier columns per batch, so the two sides of a pair and the policy and the
        reference all see the same ones), and the number of last columns that hold every answer."""
        seqs = [pairs.chosen[i] for i in indices] + [pairs.rejected[i] for i in indices]
        starts = [pairs.prompt_lengths[i] for i in indices] * 2
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        answer = torch.zeros((len(seqs), width), dtype=torch.float32)
        for row, (seq, start) in enumerate(zip(seqs, starts)):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
            answer[row, start : len(seq)] = 1.0
        n_answer = width - min(starts)
        device = modeling.device()
        return ids.to(device), mask.to(device), answer[:, -n_answer:].to(device), n_answer

    def logps(self, ids: Tensor, mask: Tensor, answer: Tensor, n_answer: int) -> Tensor:
        """[2b, n_answer] log-prob of each answer token (0 elsewhere), under whatever adapter state is current."""
        return self.policy.score(ids, mask, n_answer, values=False).logprobs * answer

    def pair_terms(self, pairs: PreferencePairs, indices: list[int]) -> dict[str, Tensor]:
        """Loss per pair (with dpo.sft_weight, the chosen answers' NLL added), implicit rewards and the KL proxy of a
        micro-batch: the reference first, without a graph, so its activations are gone before the policy's are made."""
        cfg, b = self.cfg, len(indices)
        ids, mask, answer, n_answer = self.collate(pairs, indices)
        with torch.no_grad(), self.policy.reference():
            ref = self.logps(ids, mask, answer, n_answer)
        own = self.logps(ids, mask, answer, n_answer)
        seq, ref_seq, tokens = own.sum(-1), ref.sum(-1), answer.sum(-1)
        losses, chosen_rewards, rejected_rewards = dpo_losses(
            seq[:b], seq[b:], ref_seq[:b], ref_seq[b:], cfg.beta, cfg.loss_type, cfg.label_smoothing,
            tokens[:b], tokens[b:],
        )  # fmt: skip
        # The chosen answers' negative log-likelihood per token over the micro-batch (RPO; trl's `sft` loss term).
        chosen_nll = -seq[:b].sum() / tokens[:b].sum().clamp(min=1)
        if cfg.sft_weight:
            losses = losses + cfg.sft_weight * chosen_nll
        with torch.no_grad():
            mean_logp = seq.detach() / tokens.clamp(min=1)
        return {
            "losses": losses,
            "chosen_nll": chosen_nll.detach(),
            "chosen_rewards": chosen_rewards,
            "rejected_rewards": rejected_rewards,
            "kl_proxy": kl_proxy(own.detach(), ref, answer),
            "likelihood_right": (mean_logp[:b] > mean_logp[b:]).float(),
            "tokens": mask.sum(),
        }

    # --- one optimizer step ---
    def train_step(self) -> dict:
        cfg = self.cfg
        started = time.perf_counter()
        torch.manual_seed(cfg.seed * 1_000_003 + self.step)  # LoRA dropout: the same draws on a resumed run
        self.model.train()
        micro_batches = self.step_pairs(self.step)
        n_pairs = sum(len(m) for m in micro_batches)
        parts: dict[str, list[Tensor]] = {}
        tokens = 0
        for indices in micro_batches:
            terms = self.pair_terms(self.train_pairs, indices)
            # Weighted by pairs, so the accumulated gradient is that of the mean loss over the whole step.
            (terms["losses"].sum() / n_pairs).backward()
            for key in ("losses", "chosen_rewards", "rejected_rewards", "kl_proxy", "chosen_nll"):
                parts.setdefault(key, []).append(terms[key].detach().float().cpu().reshape(-1))
            tokens += int(terms["tokens"])
        got = {k: torch.cat(v) for k, v in parts.items()}
        loss_value = got["losses"].mean().item()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm))
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
            saved = checkpoint.saved_steps(self.run.dpo_checkpoints)
            kept = f"the last checkpoint, {saved[-1]}, is kept" if saved else "no checkpoint was saved yet"
            raise NonFiniteLoss(
                f"DPO's loss or gradient is not finite at step {self.step + 1} ({kept}); lower dpo.learning_rate, "
                f"or with model.dtype=float16 try bfloat16 (fp16 overflow)"
            )
        lr = self.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        elapsed = time.perf_counter() - started
        stats = reward_stats(got["chosen_rewards"], got["rejected_rewards"])
        row = {
            "step": self.step,
            "loss": loss_value,
            **stats,
            "kl_proxy": got["kl_proxy"].mean().item(),
            "chosen_nll": got["chosen_nll"].mean().item(),
            "lr": lr,
            "grad_norm": grad_norm,
            "epoch": self.step * n_pairs / len(self.train_pairs),
            "tokens_per_s": tokens / elapsed,  # prompt and answer tokens of both sides, through policy and reference
            "peak_mem_bytes": peak_memory_bytes(),
            "time_step": elapsed,
        }
        self.log.metrics(row)
        return row

    def train(self) -> None:
        bar = self.bar = progress("dpo", self.total_steps, self.step, True)
        while self.step < self.total_steps and not self.stop_requested:
            row = self.train_step()
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['accuracy']:.2f}", kl=f"{row['kl_proxy']:.2f}")
            if self.step % self.cfg.save_steps == 0 or self.step == self.total_steps or self.stop_requested:
                self.save_checkpoint()
        bar.close()

    # --- evaluation ---
    @torch.no_grad()
    def evaluate_pairs(self) -> dict:
        """Every held-out pair, `batch_size` pairs a forward: the implicit rewards' accuracy and margin, the loss, and
        how often the policy itself finds the chosen answer likelier per token (`likelihood_accuracy`: the
        reference's before training, when the implicit rewards are all 0)."""
        self.model.eval()
        parts: dict[str, list[Tensor]] = {}
        n = len(self.eval_pairs)
        for start in range(0, n, self.cfg.batch_size):
            terms = self.pair_terms(self.eval_pairs, list(range(start, min(start + self.cfg.batch_size, n))))
            for key in ("losses", "chosen_rewards", "rejected_rewards", "kl_proxy", "likelihood_right"):
                parts.setdefault(key, []).append(terms[key].float().cpu())
        self.model.train()
        got = {k: torch.cat(v) for k, v in parts.items()}
        return {
            **reward_stats(got["chosen_rewards"], got["rejected_rewards"]),
            "loss": got["losses"].mean().item(),
            "kl_proxy": got["kl_proxy"].mean().item(),
            "likelihood_accuracy": got["likelihood_right"].mean().item(),
            "n_pairs": n,
        }

    def evaluate_generations(self) -> dict:
        """PPO's held-out evaluation (judged reward and positive rate, KL to the reference, diversity, perplexity) on
        generations for held-out prompts; {} without a judge."""
        if self.judge is None:
            return {}
        from rlhf.rl.evaluate import evaluate

        cfg = self.cfg
        return evaluate(
            self.gen_policy, self.tokenizer, self.judge, self.eval_prompts, self.eval_texts, cfg.generation,
            cfg.rollout_batch_size, cfg.seed + 12345,
        )  # fmt: skip

    # --- checkpoints ---
    def settings(self) -> dict:
        return {"dpo": self.cfg.model_dump(mode="json"), "total_steps": self.total_steps}

    def save_checkpoint(self) -> None:
        from peft import get_peft_model_state_dict

        adapter = {k: v.detach().float() for k, v in get_peft_model_state_dict(self.model).items()}
        checkpoint.save(self.run.dpo_checkpoints, self.step, {"adapter": adapter}, self.optimizer,
                        {"settings": self.settings()})  # fmt: skip

    def load_checkpoint(self) -> dict:
        from peft import set_peft_model_state_dict

        checkpoint.remove_partial(self.run.dpo_checkpoints, self.run.dpo_adapter)
        tensors, optimizer, state = checkpoint.load_newest(
            self.run.dpo_checkpoints, ("adapter",), lambda m: print(f"dpo: warning: {m}", file=self.out)
        )
        device = modeling.device()
        set_peft_model_state_dict(self.model, {k: v.to(device) for k, v in tensors["adapter"].items()})
        self.optimizer.load_state_dict(optimizer)
        self.step = int(state["step"])
        return state
