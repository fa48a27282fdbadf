"""Step 3, `rlhf ppo`: PPO on the merged model with a second LoRA, a value head and a classifier reward.

Reads as setup -> evaluate (before) -> train loop -> save -> evaluate (after). Each PPO step:
  1. sample prompts and generate responses (KV cache on, checkpointing off)
  2. score the text with the reward model
  3. forward passes without grad: policy log-probs and values, reference log-probs (adapter disabled)
  4. per-token rewards (score - beta * KL), GAE advantages, whitening
  5. ppo_epochs over shuffled mini-batches: clipped policy and value losses, optimizer steps
  6. KL controller update, metrics, samples, checkpoint
"""

from __future__ import annotations

import io
import json
import os
import random
import resource
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rlhf import modeling
from rlhf.config import Recipe
from rlhf.data import load_texts
from rlhf.errors import UserError
from rlhf.io import append_jsonl, atomic_dir, atomic_write_json, atomic_write_text, read_jsonl
from rlhf.ppo import core
from rlhf.ppo.policy import PolicyWithValue, ValueHead
from rlhf.rewards import load_reward
from rlhf.runs import Run

CHECKPOINTS_KEPT = 2
METRIC_KEYS = (
    "step", "reward_mean", "reward_std", "kl", "kl_coef", "policy_loss", "value_loss", "entropy", "clipfrac",
    "approx_kl", "response_len", "tokens_per_s", "peak_mem_bytes",
)  # fmt: skip


class NonFiniteError(RuntimeError):
    """Too many non-finite batches in a row: the run stops (exit 1) with its last good checkpoint on disk."""

    exit_code = 1


# --- distributed helpers: plain torch.distributed, launched by `accelerate launch` or torchrun --------------------


def world() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed() -> None:
    rank, size = world()
    if size > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group(backend)


def all_true(flag: bool) -> bool:
    """True on every rank when the flag is true on every rank: ranks must agree on skipping a batch or stopping, or
    one of them waits forever in the next collective."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    t = torch.tensor([0.0 if flag else 1.0])
    torch.distributed.all_reduce(t)
    return t.item() == 0.0


def all_mean(value: float) -> float:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return float(t.item()) / torch.distributed.get_world_size()


def sync_gradients(params: list[torch.nn.Parameter]) -> None:
    """Data parallel: average the gradients of the trainable parameters across ranks (what DDP does)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    size = torch.distributed.get_world_size()
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        torch.distributed.all_reduce(p.grad)
        p.grad /= size


def check_in_sync(params: list[torch.nn.Parameter]) -> None:
    """Data parallel: every rank must hold the same weights after training; a difference is a bug, not noise."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    total = torch.tensor([sum(p.detach().double().sum().item() for p in params)], dtype=torch.float64)
    low, high = total.clone(), total.clone()
    torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MIN)
    torch.distributed.all_reduce(high, op=torch.distributed.ReduceOp.MAX)
    if (high - low).abs().item() > 1e-9 * max(1.0, total.abs().item()):
        raise RuntimeError(f"ranks hold different weights after training (checksums {low.item()} .. {high.item()})")


def broadcast_parameters(params: list[torch.nn.Parameter]) -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        for p in params:
            torch.distributed.broadcast(p.data, src=0)


# --- memory and time --------------------------------------------------------------------------------------------


def peak_memory_bytes() -> int:
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_reserved())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


@dataclass
class Timer:
    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, since: float) -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - since
        return now


# --- prompts ----------------------------------------------------------------------------------------------------


class Prompts:
    """Prompts are the first k tokens (k drawn per prompt) of documents, tokenized exactly as in SFT."""

    def __init__(self, texts: list[str], tokenizer, min_tokens: int, max_tokens: int, seed: int):
        self.tokens = [ids[:max_tokens] for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
        self.tokens = [ids for ids in self.tokens if len(ids) >= min_tokens]
        if not self.tokens:
            raise UserError(f"no document has {min_tokens} tokens to make a prompt from; check ppo.prompt_min_tokens")
        self.min_tokens, self.max_tokens, self.seed = min_tokens, max_tokens, seed

    def batch(self, step: int, size: int, rank: int = 0, world_size: int = 1) -> list[list[int]]:
        """The prompts of one step: a function of (seed, step, rank) alone, so a resumed run sees the same ones."""
        n = len(self.tokens)
        out = []
        for j in range(size):
            index = step * size * world_size + rank * size + j
            epoch, pos = divmod(index, n)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
            out.append(self.tokens[int(order[pos])])
        g = torch.Generator().manual_seed(self.seed * 7919 + step * 31 + rank)
        lengths = torch.randint(self.min_tokens, self.max_tokens + 1, (size,), generator=g).tolist()
        return [ids[:k] for ids, k in zip(out, lengths)]


def left_pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(s)
        mask[i, width - len(s) :] = 1
    return ids.to(device), mask.to(device)


def step_seed(seed: int, step: int, rank: int) -> int:
    """Sampling in step N is seeded by (seed, N, rank): resuming at any step reproduces it exactly."""
    return (seed * 1_000_003 + step * 9176 + rank * 131) % (2**63)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


# --- the trainer ------------------------------------------------------------------------------------------------


@dataclass
class Rollout:
    query: torch.Tensor  # [B, P] left-padded prompts
    query_mask: torch.Tensor
    response: torch.Tensor  # [B, R]
    response_mask: torch.Tensor  # [B, R] 1 on response tokens that count
    texts: list[str]
    prompts: list[str]
    responses: list[str]
    scores: torch.Tensor  # [B] raw reward-model scores
    positive: torch.Tensor  # [B] bool
    logprobs: torch.Tensor  # [B, R]
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    entropy: torch.Tensor


class PPOTrainer:
    def __init__(self, recipe: Recipe, run: Run, reward_name: str, out=None):
        self.recipe, self.run, self.reward_name = recipe, run, reward_name
        self.out = out if out is not None else sys.stderr  # looked up now, not at import: redirections apply
        self.cfg = recipe.ppo
        self.rank, self.world_size = world()
        self.step = 0
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0
        self.retries = 0
        self.timer = Timer()
        self.stop_requested = False

    # --- setup ---
    def setup(self) -> None:
        cfg = self.cfg
        seed_everything(cfg.seed)
        self._setup_model()
        self._setup_reward()
        self._setup_data()
        self._setup_optimizer()
        self.kl_ctl = core.make_kl_controller(
            "adaptive" if cfg.adaptive_kl else "fixed", cfg.init_kl_coef, cfg.target_kl, cfg.kl_horizon
        )
        self.score_transform = core.ScoreTransform(cfg.score_clip, cfg.score_scale, cfg.score_norm)

    def _setup_model(self) -> None:
        merged = self.run.merged
        if not (merged / "config.json").is_file():
            raise UserError(f"no merged model in {self.run.root}; run `rlhf merge --run {self.run.root}` first")
        model_cfg = self.recipe.model.model_copy(update={"name": str(merged)})
        self.tokenizer = modeling.load_tokenizer(merged, model_cfg.trust_remote_code)
        base = modeling.load_base(model_cfg, merged)
        modeling.prepare_for_training(base, self.cfg.gradient_checkpointing)
        self.model = modeling.add_lora(base, self.cfg.lora)
        value_head = ValueHead(base.config.hidden_size).to(modeling.device())
        self.policy = PolicyWithValue(self.model, value_head, self.cfg.generation.temperature)
        self.params = self.policy.trainable_parameters()
        broadcast_parameters(self.params)
        self.device = modeling.device()

    def _setup_reward(self) -> None:
        self.reward = load_reward(self.reward_name)

    def _setup_data(self) -> None:
        data, cfg = self.recipe.data, self.cfg
        train = load_texts(data, data.train_split, min_chars=cfg.prompt_min_chars)
        self.prompts = Prompts(train, self.tokenizer, cfg.prompt_min_tokens, cfg.prompt_max_tokens, cfg.seed)
        try:
            held_out = load_texts(data, data.eval_split, min_chars=cfg.prompt_min_chars)
        except UserError:
            held_out = train[-max(cfg.eval_prompts, 1) :]  # no eval split: the tail of train, said in eval.json
            self.eval_source = f"{data.train_split} (last {len(held_out)})"
        else:
            self.eval_source = data.eval_split
        self.eval_texts = held_out[: cfg.eval_prompts]
        self.eval_prompts = Prompts(
            self.eval_texts or held_out[:1], self.tokenizer, cfg.prompt_min_tokens, cfg.prompt_max_tokens, cfg.seed + 1
        )

    def _setup_optimizer(self) -> None:
        if self.cfg.optimizer == "adam_8bit":
            import bitsandbytes as bnb

            self.optimizer = bnb.optim.Adam8bit(self.params, lr=self.cfg.learning_rate)
        else:
            self.optimizer = torch.optim.Adam(self.params, lr=self.cfg.learning_rate)

    # --- 1-3: rollout ---
    @torch.no_grad()
    def rollout(self, prompts: list[list[int]], seed: int) -> Rollout:
        cfg, gen = self.cfg, self.cfg.generation
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        lengths = torch.randint(gen.min_new_tokens, gen.max_new_tokens + 1, (len(prompts),), generator=g)
        pad = self.tokenizer.pad_token_id
        self.model.eval()  # no checkpointing and a live KV cache while generating
        chunks = []
        for start in range(0, len(prompts), cfg.rollout_batch_size):
            sub = prompts[start : start + cfg.rollout_batch_size]
            query, qmask = left_pad(sub, pad, self.device)
            t = time.perf_counter()
            response, rmask = self.policy.generate(
                query,
                qmask,
                int(lengths[start : start + len(sub)].max()),
                gen.top_k,
                gen.top_p,
                self.tokenizer.eos_token_id if gen.stop_at_eos else None,
            )
            # Each response runs to its own drawn length; the rest of the row is padding.
            within = torch.arange(response.shape[1], device=self.device)[None] < lengths[
                start : start + len(sub), None
            ].to(self.device)
            rmask = rmask * within.long()
            response = torch.where(rmask.bool(), response, torch.full_like(response, pad))
            t = self.timer.add("generate", t)
            chunks.append((query, qmask, response, rmask))

        # One layout for the whole batch: prompts left-padded to P, responses right-padded to R.
        P = max(c[0].shape[1] for c in chunks)
        R = max(c[2].shape[1] for c in chunks)
        query = torch.cat([_pad_left(c[0], P, pad) for c in chunks])
        qmask = torch.cat([_pad_left(c[1], P, 0) for c in chunks])
        response = torch.cat([_pad_right(c[2], R, pad) for c in chunks])
        rmask = torch.cat([_pad_right(c[3], R, 0) for c in chunks])

        t = time.perf_counter()
        prompt_texts = self.tokenizer.batch_decode(query.masked_fill(qmask == 0, pad), skip_special_tokens=True)
        response_texts = [
            self.tokenizer.decode(r[m.bool()].tolist(), skip_special_tokens=True) for r, m in zip(response, rmask)
        ]
        texts = [p + r for p, r in zip(prompt_texts, response_texts)]
        scored = self.reward(texts)
        t = self.timer.add("reward", t)

        logprobs, ref_logprobs, values, entropy = [], [], [], []
        ids, mask = torch.cat([query, response], 1), torch.cat([qmask, rmask], 1)
        # Score in the mode the optimisation runs in: bitsandbytes' int8 layers compute differently in train and
        # eval mode (~0.05 nats on the tiny model), and the PPO ratio must start at exactly 1.
        self.model.train()
        for start in range(0, len(prompts), cfg.rollout_batch_size):
            sl = slice(start, start + cfg.rollout_batch_size)
            s = self.policy.score(ids[sl], mask[sl], R, values=True, entropy=True)
            with self.policy.reference():
                ref = self.policy.score(ids[sl], mask[sl], R, values=False)
            logprobs.append(s.logprobs)
            values.append(s.values)
            entropy.append(s.entropy)
            ref_logprobs.append(ref.logprobs)
        self.timer.add("forward", t)
        return Rollout(
            query,
            qmask,
            response,
            rmask.float(),
            texts,
            prompt_texts,
            response_texts,
            scored.scores.to(self.device),
            scored.positive,
            torch.cat(logprobs),
            torch.cat(ref_logprobs),
            torch.cat(values),
            torch.cat(entropy),
        )

    # --- 4-5: advantages and optimisation ---
    def optimise(self, ro: Rollout) -> dict[str, float]:
        cfg = self.cfg
        mask = ro.response_mask
        scores = self.score_transform(ro.scores.float())
        rewards, kl = core.compute_rewards(
            scores, ro.logprobs, ro.ref_logprobs, mask, self.kl_ctl.value, cfg.kl_estimator
        )
        advantages, returns = core.compute_gae(
            ro.values, rewards, mask, cfg.gamma, cfg.lam, whiten=cfg.whiten_advantages
        )

        n = len(ro.texts)
        micro = core.exact_div(
            cfg.mini_batch_size, cfg.gradient_accumulation_steps, "mini_batch_size / gradient_accumulation_steps"
        )
        ids = torch.cat([ro.query, ro.response], 1)
        attn = torch.cat([ro.query_mask, ro.response_mask.long()], 1)
        R = ro.response.shape[1]
        stats: dict[str, list[float]] = {
            "policy_loss": [],
            "value_loss": [],
            "clipfrac": [],
            "approx_kl": [],
            "vf_clipfrac": [],
        }
        g = torch.Generator().manual_seed(step_seed(cfg.seed, self.step, self.rank) + 1)
        self.model.train()  # checkpointing applies in train mode; LoRA dropout is 0 so log-probs match the rollout
        t = time.perf_counter()
        skipped = applied = 0
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(n, generator=g)
            for mb_start in range(0, n, cfg.mini_batch_size):
                mb = order[mb_start : mb_start + cfg.mini_batch_size]
                self.optimizer.zero_grad(set_to_none=True)
                finite = True
                for mc_start in range(0, len(mb), micro):
                    idx = mb[mc_start : mc_start + micro].to(self.device)
                    out = self.policy.score(ids[idx], attn[idx], R, values=True)
                    m = mask[idx]
                    pg, pg_stats = core.policy_loss(out.logprobs, ro.logprobs[idx], advantages[idx], m, cfg.cliprange)
                    vf, vf_stats = core.value_loss(out.values, ro.values[idx], returns[idx], m, cfg.cliprange_value)
                    loss = (pg + cfg.vf_coef * vf) * (len(idx) / len(mb))
                    if not torch.isfinite(loss):
                        finite = False
                        break
                    loss.backward()
                    stats["policy_loss"].append(pg.item())
                    stats["value_loss"].append(vf.item())
                    stats["clipfrac"].append(pg_stats["clipfrac"].item())
                    stats["approx_kl"].append(pg_stats["approx_kl"].item())
                    stats["vf_clipfrac"].append(vf_stats["vf_clipfrac"].item())
                if not all_true(finite):
                    # A non-finite loss would poison the adapter and Adam's moments: drop this mini-batch's update.
                    skipped += 1
                    self.optimizer.zero_grad(set_to_none=True)
                    continue
                sync_gradients(self.params)
                if cfg.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
                self.optimizer.step()
                applied += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.timer.add("train", t)
        seq_kl = (kl * mask).sum(1)
        result = {k: (sum(v) / len(v) if v else float("nan")) for k, v in stats.items()}
        result["kl"] = all_mean(seq_kl.mean().item())
        result["skipped_minibatches"] = skipped
        result["applied_minibatches"] = applied
        return result

    # --- the loop ---
    def train(self) -> None:
        cfg = self.cfg
        metrics_path = self.run.ppo_dir / "metrics.jsonl"
        bar = self.bar = _progress(cfg.max_steps, self.step, self.rank == 0)
        while self.step < cfg.max_steps and not self.stop_requested:
            self.timer = Timer()
            started = time.perf_counter()
            prompts = self.prompts.batch(self.step, cfg.batch_size, self.rank, self.world_size)
            ro = self.rollout(prompts, step_seed(cfg.seed, self.step, self.rank) + 7919 * self.retries)
            if not all_true(bool(torch.isfinite(ro.scores).all() and torch.isfinite(ro.logprobs).all())):
                self._nonfinite("reward or log-probs")
                continue
            kl_coef = self.kl_ctl.value
            stats = self.optimise(ro)
            if stats["applied_minibatches"] == 0:  # every mini-batch had a non-finite loss: nothing was learned
                self._nonfinite("loss")
                continue
            self.nonfinite_in_a_row = self.retries = 0
            self.nonfinite_total += stats["skipped_minibatches"]
            # 6. KL controller: Ziegler et al. use the batch's mean per-sequence KL and the number of samples seen.
            self.kl_ctl.update(stats["kl"], cfg.batch_size * self.world_size)
            self.step += 1
            elapsed = time.perf_counter() - started
            n_tokens = float(ro.response_mask.sum().item())
            row = {
                "step": self.step,
                "reward_mean": all_mean(ro.scores.mean().item()),
                "reward_std": ro.scores.std().item() if len(ro.scores) > 1 else 0.0,
                "positive_rate": all_mean(ro.positive.float().mean().item()),
                "kl": stats["kl"],
                "kl_coef": kl_coef,
                "policy_loss": stats["policy_loss"],
                "value_loss": stats["value_loss"],
                "entropy": core.masked_mean(ro.entropy, ro.response_mask).item(),
                "clipfrac": stats["clipfrac"],
                "approx_kl": stats["approx_kl"],
                "vf_clipfrac": stats["vf_clipfrac"],
                "response_len": n_tokens / len(ro.texts),
                "tokens_per_s": n_tokens / elapsed,
                "peak_mem_bytes": peak_memory_bytes(),
                "nonfinite_skipped": self.nonfinite_total,  # batches and mini-batches skipped so far
                **{f"time_{k}": v for k, v in self.timer.seconds.items()},
                "time_step": elapsed,
            }
            if self.rank == 0:
                append_jsonl(metrics_path, row)
                self._tensorboard(row)
                if self.step % cfg.sample_every == 0 or self.step == 1:
                    self._samples(ro)
                bar.update(1)
                bar.set_postfix(
                    reward=f"{row['reward_mean']:.2f}", kl=f"{row['kl']:.2f}", pos=f"{row['positive_rate']:.2f}"
                )
            if self.world_size > 1:  # Ctrl-C may reach the ranks at different steps: all stop at the same one
                self.stop_requested = not all_true(not self.stop_requested)
            if self.step % cfg.save_steps == 0 or self.step == cfg.max_steps or self.stop_requested:
                self.save_checkpoint()
        bar.close()

    def _nonfinite(self, what: str) -> None:
        self.nonfinite_in_a_row += 1
        self.nonfinite_total += 1
        if self.rank == 0:
            print(
                f"ppo: warning: non-finite {what} at step {self.step + 1}; batch skipped "
                f"({self.nonfinite_in_a_row} in a row)",
                file=self.out,
            )
        if self.nonfinite_in_a_row >= self.cfg.nonfinite_patience:
            saved = sorted(self.run.ppo_checkpoints.glob("step-*"), key=_step_of)
            kept = f"the last good checkpoint, {saved[-1]}, is kept" if saved else "no checkpoint was saved yet"
            raise NonFiniteError(
                f"{self.nonfinite_in_a_row} batches in a row had a non-finite {what}; stopped at step {self.step} "
                f"({kept}). Likely causes: a reward model or function returning NaN/inf, LayerNorms not in fp32, "
                f"ppo.learning_rate too high, or reward scores too large (try ppo.score_clip or ppo.score_norm=true)"
            )
        self.retries += 1  # the next attempt must not replay the same random draws

    def _samples(self, ro: Rollout, n: int = 4) -> None:
        for i in range(min(n, len(ro.texts))):
            append_jsonl(
                self.run.ppo_dir / "samples.jsonl",
                {
                    "step": self.step,
                    "prompt": ro.prompts[i],
                    "response": ro.responses[i],
                    "reward": ro.scores[i].item(),
                },
            )

    def _tensorboard(self, row: dict) -> None:
        if not hasattr(self, "_tb"):
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.run.ppo_dir / "tensorboard"))
            except Exception:  # tensorboard is optional at run time
                self._tb = None
        if self._tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(f"ppo/{key}", value, row["step"])
            self._tb.flush()

    # --- checkpoints ---
    def _adapter_state(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        return {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(self.model).items()}

    def save_checkpoint(self) -> None:
        if self.rank != 0:
            return
        path = self.run.ppo_checkpoints / f"step-{self.step}"
        with atomic_dir(path) as tmp:
            save_file(self._adapter_state(), str(tmp / "adapter.safetensors"))
            save_file(
                {k: v.cpu().contiguous() for k, v in self.policy.value_head.state_dict().items()},
                str(tmp / "value_head.safetensors"),
            )
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            atomic_write_json(
                tmp / "state.json",
                {
                    "step": self.step,
                    "kl_controller": self.kl_ctl.state_dict(),
                    "score_transform": self.score_transform.state_dict(),
                    "nonfinite_total": self.nonfinite_total,
                    "seed": self.cfg.seed,
                    # Prompts and sampling are functions of (seed, step, rank): the step is the data position and the
                    # RNG state at once, so a resumed run draws exactly what the uninterrupted one would have.
                    "rng": "seeded per step: step_seed(seed, step, rank)",
                },
            )
        for old in sorted(self.run.ppo_checkpoints.glob("step-*"), key=_step_of)[:-CHECKPOINTS_KEPT]:
            import shutil

            shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self) -> int:
        """Restore the newest readable checkpoint; a damaged one is skipped with a warning."""
        import shutil

        from peft import set_peft_model_state_dict

        if self.rank == 0:  # a save that was killed half-way left its temporary directory (atomic_dir's .NAME.*)
            for partial in [*self.run.ppo_checkpoints.glob(".step-*"), *self.run.ppo_dir.glob(".adapter.*")]:
                shutil.rmtree(partial, ignore_errors=True)
        candidates = sorted(self.run.ppo_checkpoints.glob("step-*"), key=_step_of, reverse=True)
        if not candidates:
            raise UserError(f"--resume: no PPO checkpoint in {self.run.ppo_checkpoints}; run without --resume")
        for path in candidates:
            try:
                adapter = load_file(str(path / "adapter.safetensors"))
                value_head = load_file(str(path / "value_head.safetensors"))
                optimizer = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
                state = json.loads((path / "state.json").read_text())
            except Exception as exc:  # truncated or missing files: fall back to the one before
                print(
                    f"ppo: warning: checkpoint {path.name} is unreadable ({type(exc).__name__}); "
                    f"trying the previous one",
                    file=self.out,
                )
                continue
            set_peft_model_state_dict(self.model, {k: v.to(self.device) for k, v in adapter.items()})
            self.policy.value_head.load_state_dict({k: v.to(self.device) for k, v in value_head.items()})
            self.optimizer.load_state_dict(optimizer)
            self.kl_ctl.load_state_dict(state["kl_controller"])
            self.score_transform.load_state_dict(state["score_transform"])
            self.nonfinite_total = state.get("nonfinite_total", 0)
            self.step = int(state["step"])
            return self.step
        raise UserError(
            f"--resume: every checkpoint in {self.run.ppo_checkpoints} is damaged; start PPO over with --force"
        )

    def save_final(self) -> Path:
        out = self.run.ppo_adapter
        if self.rank == 0:
            with atomic_dir(out) as tmp:
                self.model.save_pretrained(tmp, safe_serialization=True)
                save_file(
                    {k: v.cpu().contiguous() for k, v in self.policy.value_head.state_dict().items()},
                    str(tmp / "value_head.safetensors"),
                )
                atomic_write_text(tmp / "README.md", _ppo_card(self.recipe, self.reward_name, self.step))
        return out

    # --- evaluation ---
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Reward, positive rate and KL on held-out prompts (fixed seed), and perplexity on held-out text."""
        import evaluate as hf_evaluate

        if not self.eval_texts:
            return {}
        prompts = self.eval_prompts.batch(0, len(self.eval_texts))
        ro = self.rollout(prompts, seed=self.cfg.seed + 12345)
        kl = ((ro.logprobs - ro.ref_logprobs) * ro.response_mask).sum(1)
        reward_stats = hf_evaluate.load(str(metric_path("reward_stats")))
        stats = reward_stats.compute(predictions=ro.scores.tolist(), references=[int(p) for p in ro.positive.tolist()])
        ppl = self.perplexity(hf_evaluate.load(str(metric_path("token_perplexity"))))
        return {
            "reward": stats["mean_reward"],
            "positive_rate": stats["positive_rate"],
            "kl": kl.mean().item(),
            "perplexity": ppl,
            "samples": [
                {"prompt": p, "response": r, "reward": s}
                for p, r, s in zip(ro.prompts[:8], ro.responses[:8], ro.scores[:8].tolist())
            ],
        }

    def perplexity(self, metric, n_docs: int = 32, max_tokens: int = 128) -> float:
        ids = self.tokenizer(self.eval_texts[:n_docs], add_special_tokens=False)["input_ids"]
        nll, count = [], []
        self.model.eval()
        for doc in ids:
            doc = doc[:max_tokens]
            if len(doc) < 2:
                continue
            x = torch.tensor([doc], device=self.device)
            lp = self.policy.score(x, torch.ones_like(x), len(doc) - 1, values=False).logprobs
            nll.append(-lp.sum().item())
            count.append(len(doc) - 1)
        return metric.compute(predictions=nll, references=count)["perplexity"]


def metric_path(name: str) -> Path:
    return Path(__file__).resolve().parent.parent / "metrics" / name


def _pad_left(x: torch.Tensor, width: int, value: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (width - x.shape[1], 0), value=value)


def _pad_right(x: torch.Tensor, width: int, value: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)


def _step_of(path: Path) -> int:
    try:
        return int(path.name.split("-")[-1])
    except ValueError:
        return -1


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="ppo", unit="step", disable=not enabled, dynamic_ncols=True)


def _ppo_card(recipe: Recipe, reward: str, steps: int) -> str:
    return (
        f"# PPO policy adapter (rlhf ppo)\n\n"
        f"- base: the merged SFT model of this run ({recipe.model.name} + SFT adapter)\n"
        f"- reward: {reward}\n"
        f"- steps: {steps} of batch {recipe.ppo.batch_size}, learning rate {recipe.ppo.learning_rate}\n"
        f"- date: {time.strftime('%Y-%m-%d')}\n\n"
        f"`value_head.safetensors` holds the value head (`summary.weight`, `summary.bias`) trained with the adapter.\n"
    )


# --- entry points -----------------------------------------------------------------------------------------------


@dataclass
class PpoResult:
    run: Run
    adapter: Path
    steps: int
    eval: dict


def prepare(recipe: Recipe, run: Run, reward: str | None, resume: bool, force: bool) -> tuple[Recipe, str]:
    if not run.recipe_path.is_file():
        raise UserError(f"{run.root} holds no run; run `rlhf sft --run {run.root}` and `rlhf merge` first")
    trained = run.load_recipe()
    if trained.model.name != recipe.model.name:
        raise UserError(
            f"{run.root} was trained from '{trained.model.name}', but the recipe names '{recipe.model.name}'; "
            f"use the run's recipe (omit --recipe) or another --run"
        )
    if not (run.merged / "config.json").is_file():
        raise UserError(f"no merged model in {run.root}; run `rlhf merge --run {run.root}` first")
    # PPO takes its own sections from the recipe given; model, LoRA, data and SFT stay as the run was trained.
    recipe = trained.model_copy(update={"ppo": recipe.ppo, "reward": recipe.reward, "budget": recipe.budget})
    reward_name = reward or recipe.reward.name
    recipe = recipe.model_copy(update={"reward": recipe.reward.model_copy(update={"name": reward_name})})
    has_ppo = (run.ppo_dir / "metrics.jsonl").exists() or run.ppo_checkpoints.exists()
    if has_ppo and not resume and not force:
        raise UserError(
            f"{run.root} already holds a PPO run; pass --resume to continue it, --force to start it again, "
            f"or use another --run"
        )
    if resume and not has_ppo and not (run.ppo_dir / "eval_before.json").exists():
        raise UserError(f"--resume: no PPO checkpoint in {run.ppo_checkpoints}; run without --resume")
    return recipe, reward_name


def run(
    recipe: Recipe,
    run_: Run,
    reward: str | None = None,
    resume: bool = False,
    force: bool = False,
    gpu: str | None = None,
) -> PpoResult:
    from rlhf import budget

    init_distributed()
    recipe, reward_name = prepare(recipe, run_, reward, resume, force)
    rank, _ = world()
    from rlhf.rewards import load_spec

    load_spec(reward_name)  # an unknown reward fails now, before anything heavy is loaded
    if recipe.ppo.optimizer == "adam_8bit":
        modeling.require_bitsandbytes("ppo.optimizer=adam_8bit", "ppo.optimizer=adam")
    budget.preflight(recipe, "ppo", gpu=gpu, force=force, out=sys.stdout if rank == 0 else io.StringIO())
    restart = resume and not any(run_.ppo_checkpoints.glob("step-*"))
    if restart:  # killed before its first checkpoint: there is nothing to continue from but the start
        resume = False
        if rank == 0:
            print(
                f"ppo: warning: no checkpoint in {run_.ppo_checkpoints} yet; starting PPO from step 0", file=sys.stderr
            )

    trainer = PPOTrainer(recipe, run_, reward_name)
    trainer.setup()
    # Only now, with the model, reward and data known to work, does the run directory change.
    if rank == 0:
        run_.write_recipe(recipe)
        if force and not resume and not restart:
            import shutil

            shutil.rmtree(run_.ppo_checkpoints, ignore_errors=True)
            for name in ("metrics.jsonl", "samples.jsonl", "eval.json", "eval_before.json"):
                (run_.ppo_dir / name).unlink(missing_ok=True)
        trainable, total = modeling.count_parameters(trainer.model)
        print(
            f"ppo: policy LoRA r={recipe.ppo.lora.rank} + value head on {recipe.model.quantization} merged model: "
            f"{trainable:,} trainable of {total:,}; reward: {reward_name}",
            file=sys.stderr,
        )

    before_path = run_.ppo_dir / "eval_before.json"
    if resume or restart:
        step = trainer.load_checkpoint() if resume else 0
        if rank == 0:
            _trim_jsonl(run_.ppo_dir / "metrics.jsonl", step)
            _trim_jsonl(run_.ppo_dir / "samples.jsonl", step)
            print(f"ppo: resumed at step {step}", file=sys.stderr)
    if before_path.is_file():
        before = json.loads(before_path.read_text())
    else:
        before = trainer.evaluate()
        if rank == 0:
            atomic_write_json(before_path, before)
    if rank == 0 and before:
        print(
            f"ppo: before: reward {before['reward']:.3f}, positive rate {before['positive_rate']:.2f}", file=sys.stderr
        )

    def on_sigint(signum, frame):
        # Finish the current step, save a checkpoint and exit 130: Ctrl-C never costs more than one step.
        trainer.stop_requested = True
        if rank == 0:
            print("\nppo: interrupted; saving a checkpoint after this step (Ctrl-C again to abort)", file=sys.stderr)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        trainer.train()
    finally:
        signal.signal(signal.SIGINT, previous)
        if hasattr(trainer, "bar"):
            trainer.bar.close()  # on an error too: its message then starts on a line of its own
    if trainer.stop_requested:
        raise KeyboardInterrupt
    check_in_sync(trainer.params)

    adapter = trainer.save_final()
    after = trainer.evaluate()
    result = {}
    if rank == 0 and after:
        result = {
            "reward_before": before["reward"],
            "reward_after": after["reward"],
            "positive_rate_before": before["positive_rate"],
            "positive_rate_after": after["positive_rate"],
            "kl_before": before["kl"],
            "kl_after": after["kl"],
            "perplexity_before": before["perplexity"],
            "perplexity_after": after["perplexity"],
            "n_prompts": len(trainer.eval_texts),
            "eval_split": trainer.eval_source,
            "steps": trainer.step,
            "samples_before": before["samples"],
            "samples_after": after["samples"],
        }
        atomic_write_json(run_.ppo_dir / "eval.json", result)
        print(
            f"ppo: done, {trainer.step} steps. reward {result['reward_before']:.3f} -> {result['reward_after']:.3f}, "
            f"positive rate {result['positive_rate_before']:.2f} -> {result['positive_rate_after']:.2f}, "
            f"KL {result['kl_after']:.2f}, perplexity {result['perplexity_before']:.1f} -> "
            f"{result['perplexity_after']:.1f}; adapter: {adapter}"
        )
    return PpoResult(run_, adapter, trainer.step, result)


def _trim_jsonl(path: Path, step: int) -> None:
    """Drop rows logged after the checkpoint we resume from: every step appears exactly once."""
    if path.exists():
        rows = [r for r in read_jsonl(path) if r.get("step", 0) <= step]
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def recipe_for(args) -> tuple[Run, Recipe]:
    """The run `rlhf ppo` works on and its recipe: --recipe, or the run's own, with the overrides and --reward."""
    from rlhf.cli import resolve_recipe
    from rlhf.runs import existing_run

    run_ = existing_run(args.run, "train with PPO")
    if args.recipe:
        recipe = resolve_recipe(args)
    else:  # the run's own recipe, with any overrides applied to it
        from rlhf.config import apply_overrides, validate

        recipe = validate(apply_overrides(run_.load_recipe().model_dump(mode="json"), list(args.overrides)))
    if args.reward:
        recipe = recipe.model_copy(update={"reward": recipe.reward.model_copy(update={"name": args.reward})})
    return run_, recipe
