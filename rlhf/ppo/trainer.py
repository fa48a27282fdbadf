"""The PPO trainer: one merged k-bit model as policy (LoRA), reference (LoRA off) and value trunk (+ value head).

setup() loads model, reward, prompts and optimizer; train() runs PPO steps until max_steps:
  1. sample prompts and generate responses (KV cache on, checkpointing off)          rlhf.rl.rollout.collect
  2. score the text with the reward model                                             rlhf.rl.rollout.collect
  3. without grad: policy log-probs and values, reference log-probs (adapter off)     rlhf.rl.rollout.score
  4-5. per-token rewards, GAE, ppo_epochs of clipped updates                          rlhf.ppo.update.optimise
  6. KL controller, metrics, samples, checkpoint
"""

from __future__ import annotations

import sys
import time

import torch

from rlhf import modeling
from rlhf.config import Recipe
from rlhf.data import load_texts
from rlhf.errors import UserError
from rlhf.ppo import core
from rlhf.ppo.update import Optimisation, micro_batch_size, optimise
from rlhf.reward_model.model import SharedBaseReward, check_same_base, reward_adapter_dir
from rlhf.rewards import Judged, load_reward, load_spec
from rlhf.rl import checkpoint, rollout
from rlhf.rl.evaluate import evaluate
from rlhf.rl.parallel import Parallel
from rlhf.rl.policy import Policy, ValueHead, disable_dropout
from rlhf.rl.prompts import Prompts, step_seed
from rlhf.rl.telemetry import Log, Timer, peak_memory_bytes, progress
from rlhf.runs import Run


class NonFiniteError(RuntimeError):
    """Too many non-finite batches in a row: the run stops (exit 1) with its last good checkpoint on disk."""

    exit_code = 1


class PPOTrainer:
    def __init__(self, recipe: Recipe, run: Run, reward_name: str, parallel: Parallel, out=None):
        self.recipe, self.run, self.reward_name, self.parallel = recipe, run, reward_name, parallel
        self.out = out if out is not None else sys.stderr  # looked up now, not at import: redirections apply
        self.cfg = recipe.ppo
        self.rank, self.world_size = parallel.rank, parallel.world_size
        self.step = 0
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0
        self.retries = 0
        self.timer = Timer()
        self.stop_requested = False
        self.log = Log(run.ppo_dir, "ppo", parallel.is_main)

    # --- setup ---
    def setup(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)  # the adapter's and value head's initial weights: the same on every rank
        reward_adapter, judge = reward_adapter_dir(self.reward_name), self.recipe.reward.judge
        if reward_adapter is not None:  # refused before the model loads when it was trained on another base
            check_same_base(reward_adapter, self.run.merged)
        if judge:
            load_spec(judge)  # an unknown judge fails now, before the model loads
        self._setup_model()
        if reward_adapter is not None:  # a learned reward: its adapter on the policy's own weights, no second model
            self.reward = SharedBaseReward(self.model, reward_adapter, self.tokenizer, cfg.rollout_batch_size)
        else:
            self.reward = load_reward(self.reward_name)
        if judge:  # `positive` (the positive rate) from an independent classifier, the score from the reward
            self.reward = Judged(self.reward, load_reward(judge))
        self._setup_data()
        self._setup_optimizer()
        self.kl_ctl = core.make_kl_controller(
            "adaptive" if cfg.adaptive_kl else "fixed", cfg.init_kl_coef, cfg.target_kl, cfg.kl_horizon
        )
        self.score_transform = core.ScoreTransform(cfg.score_clip, cfg.score_scale, cfg.score_norm)

    def _setup_model(self) -> None:
        merged = self.run.merged
        model_cfg = self.recipe.model.model_copy(update={"name": str(merged.resolve())})
        self.tokenizer = modeling.load_tokenizer(merged, model_cfg.trust_remote_code)
        base = modeling.load_base(model_cfg, merged)
        modeling.prepare_for_training(base, self.cfg.gradient_checkpointing)
        self.model = modeling.add_lora(base, self.cfg.lora)
        disable_dropout(self.model)
        value_head = ValueHead(base.config.hidden_size).to(modeling.device())
        self.policy = Policy(self.model, value_head, self.cfg.generation.temperature)
        self.params = self.policy.trainable_parameters()
        self.module = self.parallel.wrap(self.policy)  # DDP averages the adapter's and value head's gradients

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

    # --- one PPO step ---
    def ppo_step(self) -> dict | None:
        """One step on this rank's prompts; None when the batch was skipped (non-finite)."""
        cfg, parallel = self.cfg, self.parallel
        self.timer = Timer()
        started = time.perf_counter()
        seed = step_seed(cfg.seed, self.step, self.rank)
        # 1-2. generate the responses and score their text
        prompts = self.prompts.batch(self.step, cfg.batch_size, self.rank, self.world_size)
        ro = rollout.collect(
            self.policy, self.tokenizer, self.reward, prompts, cfg.generation, cfg.rollout_batch_size,
            seed + 7919 * self.retries, self.timer,
        )  # fmt: skip
        # 3. log-probs, values and reference log-probs, in the micro-batches of the first update epoch
        generator = torch.Generator().manual_seed(seed + 1)
        first_order = torch.randperm(cfg.batch_size, generator=generator)
        rollout.score(ro, self.policy, rollout.partition(first_order, micro_batch_size(cfg)), True, self.timer)
        if not parallel.all_true(bool(torch.isfinite(ro.scores).all() and torch.isfinite(ro.logprobs).all())):
            self._nonfinite("reward or log-probs")
            return None
        # 4-5. rewards, advantages and the clipped updates. Score statistics (ppo.score_norm) are taken over every
        # rank's scores, so all ranks normalise alike and the checkpoint holds one set.
        all_scores = parallel.gather(ro.scores.float())
        scores = self.score_transform(all_scores).to(ro.scores.device)
        scores = scores[self.rank * cfg.batch_size : (self.rank + 1) * cfg.batch_size]
        kl_coef = self.kl_ctl.value
        opt = Optimisation(self.module, self.params, self.optimizer, parallel)
        stats = optimise(ro, scores, opt, cfg, kl_coef, first_order, generator, self.timer)
        if stats["applied_minibatches"] == 0:  # every mini-batch was non-finite: nothing was learned
            self._nonfinite("loss or gradient")
            return None
        self.nonfinite_in_a_row = self.retries = 0
        self.nonfinite_total += stats["skipped_minibatches"]
        # 6. KL controller: Ziegler et al. use the batch's mean per-sequence KL and the number of samples seen.
        self.kl_ctl.update(stats["kl"], cfg.batch_size * self.world_size)
        self.step += 1
        elapsed = time.perf_counter() - started
        n_tokens = float(ro.response_mask.sum().item())
        all_positive = parallel.gather(ro.positive.float().to(all_scores.device))
        row = {
            "step": self.step,
            "reward_mean": all_scores.mean().item(),
            "reward_std": all_scores.std().item() if len(all_scores) > 1 else 0.0,
            "positive_rate": all_positive.mean().item(),
            "kl": stats["kl"],
            "kl_coef": kl_coef,
            **{k: stats[k] for k in ("policy_loss", "value_loss", "clipfrac", "approx_kl", "ratio", "vf_clipfrac")},
            "grad_norm": stats["grad_norm"],
            "first_ratio": stats["first_ratio"],
            "first_approx_kl": stats["first_approx_kl"],
            "first_clipfrac": stats["first_clipfrac"],
            "entropy": core.masked_mean(ro.entropy, ro.response_mask).item(),
            "response_len": n_tokens / len(ro.prompts),
            "tokens_per_s": parallel.mean(n_tokens / elapsed) * self.world_size,
            "peak_mem_bytes": peak_memory_bytes(),
            "nonfinite_skipped": self.nonfinite_total,  # batches and mini-batches skipped so far
            **{f"time_{k}": v for k, v in self.timer.seconds.items()},
            "time_step": elapsed,
        }
        self.log.metrics(row)
        if self.step % cfg.sample_every == 0 or self.step == 1:
            self.log.samples(self.step, ro.prompts, ro.responses, ro.scores.tolist())
        return row

    # --- the loop ---
    def train(self) -> None:
        cfg = self.cfg
        bar = self.bar = progress("ppo", cfg.max_steps, self.step, self.parallel.is_main)
        while self.step < cfg.max_steps and not self.stop_requested:
            row = self.ppo_step()
            if row is not None:
                bar.update(1)
                bar.set_postfix(
                    reward=f"{row['reward_mean']:.2f}", kl=f"{row['kl']:.2f}", pos=f"{row['positive_rate']:.2f}"
                )
            if self.world_size > 1:  # Ctrl-C may reach the ranks at different steps: all stop at the same one
                self.stop_requested = not self.parallel.all_true(not self.stop_requested)
            if row is not None and (
                self.step % cfg.save_steps == 0 or self.step == cfg.max_steps or self.stop_requested
            ):
                self.save_checkpoint()
        bar.close()

    def _nonfinite(self, what: str) -> None:
        self.nonfinite_in_a_row += 1
        self.nonfinite_total += 1
        if self.parallel.is_main:
            print(
                f"ppo: warning: non-finite {what} at step {self.step + 1}; batch skipped "
                f"({self.nonfinite_in_a_row} in a row)",
                file=self.out,
            )
        if self.nonfinite_in_a_row >= self.cfg.nonfinite_patience:
            saved = checkpoint.saved_steps(self.run.ppo_checkpoints)
            kept = f"the last good checkpoint, {saved[-1]}, is kept" if saved else "no checkpoint was saved yet"
            raise NonFiniteError(
                f"{self.nonfinite_in_a_row} batches in a row had a non-finite {what}; stopped at step {self.step} "
                f"({kept}). Likely causes: a reward model or function returning NaN/inf, LayerNorms not in fp32, "
                f"ppo.learning_rate too high, or reward scores too large (try ppo.score_clip or ppo.score_norm=true)"
            )
        self.retries += 1  # the next attempt must not replay the same random draws

    # --- checkpoints ---
    def _tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        from peft import get_peft_model_state_dict

        adapter = {k: v.detach().float() for k, v in get_peft_model_state_dict(self.model).items()}
        return {"adapter": adapter, "value_head": self.policy.value_head.state_dict()}

    def settings(self) -> dict:
        """What the trajectory depends on; a resume must not change it silently."""
        return {"ppo": self.cfg.model_dump(mode="json"), "reward": self.reward_name}

    def save_checkpoint(self) -> None:
        if self.parallel.is_main:
            state = {
                "kl_controller": self.kl_ctl.state_dict(),
                "score_transform": self.score_transform.state_dict(),
                "nonfinite_total": self.nonfinite_total,
                "settings": self.settings(),
            }
            checkpoint.save(self.run.ppo_checkpoints, self.step, self._tensors(), self.optimizer, state)
        self.parallel.barrier()  # no rank races ahead of a checkpoint that rank 0 is still writing or pruning

    def load_checkpoint(self) -> dict:
        """Restore the newest readable checkpoint; returns its state.json."""
        from peft import set_peft_model_state_dict

        if self.parallel.is_main:
            checkpoint.remove_partial(self.run.ppo_checkpoints, list(self.run.ppo_dir.glob(".adapter.*")))
        self.parallel.barrier()
        tensors, optimizer, state = checkpoint.load_newest(
            self.run.ppo_checkpoints, ("adapter", "value_head"), lambda m: print(f"ppo: warning: {m}", file=self.out)
        )
        device = modeling.device()
        set_peft_model_state_dict(self.model, {k: v.to(device) for k, v in tensors["adapter"].items()})
        self.policy.value_head.load_state_dict({k: v.to(device) for k, v in tensors["value_head"].items()})
        self.optimizer.load_state_dict(optimizer)
        self.kl_ctl.load_state_dict(state["kl_controller"])
        self.score_transform.load_state_dict(state["score_transform"])
        self.nonfinite_total = state.get("nonfinite_total", 0)
        self.step = int(state["step"])
        return state

    def evaluate(self) -> dict:
        cfg = self.cfg
        return evaluate(
            self.policy, self.tokenizer, self.reward, self.eval_prompts, self.eval_texts, cfg.generation,
            cfg.rollout_batch_size, cfg.seed + 12345,
        )  # fmt: skip
