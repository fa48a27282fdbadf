"""The GRPO trainer: one merged k-bit model as policy (LoRA) and reference (LoRA off); no value head.

setup() loads model, reward, prompts and optimizer (rlhf.rl.trainer); train() runs steps until max_steps:
  1. take batch_size prompts and sample each group_size times (KV cache on, checkpointing off)  rlhf.rl.rollout.collect
  2. score the text with the reward model                                                       rlhf.rl.rollout.collect
  3. without grad: policy and reference (adapter off) log-probs, in the first epoch's micro-batches
  4. group advantages: each sample against the others of its prompt (GRPO or RLOO), the KL in the reward or the loss
  5. `epochs` of clipped updates                                                                rlhf.grpo.update
  6. metrics, samples, checkpoint
A group lives on one rank (each rank samples its own prompts group_size times), so advantages need no collective.
"""

from __future__ import annotations

import time

import torch

from rlhf.grpo import core
from rlhf.grpo.update import micro_batch_size, optimise
from rlhf.rl.prompts import step_seed
from rlhf.rl.rollout import partition, score
from rlhf.rl.telemetry import Timer
from rlhf.rl.trainer import RLTrainer
from rlhf.rl.update import Optimisation


class GRPOTrainer(RLTrainer):
    name = "grpo"
    kl_setting = "grpo.beta"
    nonfinite_hint = "grpo.learning_rate too high"

    def train_step(self) -> dict | None:
        """One step on this rank's prompts; None when the batch was skipped (non-finite)."""
        cfg, parallel = self.cfg, self.parallel
        self.timer = Timer()
        started = time.perf_counter()
        seed = step_seed(cfg.seed, self.step, self.rank)
        n = cfg.batch_size * cfg.group_size
        # 1-2. each prompt group_size times in consecutive rows (rows [g * G, (g + 1) * G) are group g), rewarded
        prompts = self.prompts.draw(self.step, cfg.batch_size, self.rank, self.world_size)
        rollout = self.collect(prompts, cfg.group_size, seed + 7919 * self.retries)
        # 3. policy and reference log-probs in the micro-batches of the first update epoch (LLM.int8 is batch-dependent)
        generator = torch.Generator().manual_seed(seed + 1)
        first_order = torch.randperm(n, generator=generator)
        score(rollout, self.policy, partition(first_order, micro_batch_size(cfg)), False, self.timer)
        if not parallel.all_true(bool(torch.isfinite(rollout.scores).all() and torch.isfinite(rollout.logprobs).all())):
            self.nonfinite("reward or log-probs")
            return None
        # 4. group advantages, from the scores less beta x KL when the KL is in the reward (RLOO's placement)
        kl = core.sequence_kl(rollout.logprobs, rollout.ref_logprobs, rollout.response_mask)
        scores = rollout.scores.float()
        if cfg.kl_in == "reward":
            scores = core.kl_penalised_scores(
                scores, rollout.logprobs, rollout.ref_logprobs, rollout.response_mask, cfg.beta
            )
        advantages = core.group_advantages(scores, cfg.group_size, cfg.advantage)
        # 5. the clipped updates
        opt = Optimisation(self.module, self.params, self.optimizer, parallel)
        stats = optimise(rollout, advantages, opt, cfg, first_order, generator, self.timer)
        if stats["applied_minibatches"] == 0:  # every mini-batch was non-finite: nothing was learned
            self.nonfinite("loss or gradient")
            return None
        self.nonfinite_in_a_row = self.retries = 0
        self.nonfinite_total += stats["skipped_minibatches"]
        self.step += 1
        # 6. metrics over every rank's samples (a rank's rows are whole groups, so gathered rows are too)
        elapsed = time.perf_counter() - started
        all_scores = parallel.gather(rollout.scores.float())
        all_positive = parallel.gather(rollout.positive.float().to(all_scores.device))
        row = {
            "step": self.step,
            **self.reward_metrics(rollout, all_scores, all_positive),
            **core.group_stats(all_scores, cfg.group_size),
            "kl": parallel.mean(kl.mean().item()),
            "kl_coef": cfg.beta,
            **{k: stats[k] for k in ("loss", "policy_loss", "kl_loss", "clipfrac", "approx_kl", "ratio")},
            **self.step_metrics(rollout, stats, elapsed),
        }
        self.log.metrics(row)
        if self.step % cfg.sample_every == 0 or self.step == 1:  # one sample per prompt
            g = cfg.group_size
            self.log.samples(self.step, rollout.prompts[::g], rollout.responses[::g], rollout.scores[::g].tolist())
        return row
