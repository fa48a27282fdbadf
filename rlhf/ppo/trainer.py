"""The PPO trainer: one merged k-bit model as policy (LoRA), reference (LoRA off) and value trunk (+ value head).

setup() loads model, reward, prompts and optimizer; train() runs PPO steps until max_steps:
  1. sample prompts and generate responses (KV cache on, checkpointing off)          rlhf.rl.rollout.collect
  2. score the text with the reward model                                             rlhf.rl.rollout.collect
  3. without grad: policy log-probs and values, reference log-probs (adapter off)     rlhf.rl.rollout.score
  4-5. per-token rewards, GAE, ppo_epochs of clipped updates                          rlhf.ppo.update.optimise
  6. KL controller, metrics, samples, checkpoint
The loop, the non-finite guard, checkpoints and evaluation are every RL step's: rlhf.rl.trainer.
"""

from __future__ import annotations

import time

import torch

from rlhf import modeling
from rlhf.ppo import core
from rlhf.ppo.update import Optimisation, micro_batch_size, optimise
from rlhf.rl.prompts import step_seed
from rlhf.rl.rollout import partition, score
from rlhf.rl.telemetry import Timer
from rlhf.rl.trainer import RLTrainer


class PPOTrainer(RLTrainer):
    name = "ppo"
    value_head = True
    kl_setting = "ppo.target_kl"
    nonfinite_hint = (
        "ppo.learning_rate too high, or reward scores too large (try ppo.score_clip or ppo.score_norm=true)"
    )

    def setup(self) -> None:
        super().setup()
        self.setup_controllers()

    def setup_controllers(self) -> None:
        """The KL controller and the score transform (a checkpoint restores their state over these)."""
        cfg = self.cfg
        self.kl_ctl = core.make_kl_controller(
            "adaptive" if cfg.adaptive_kl else "fixed", cfg.init_kl_coef, cfg.target_kl, cfg.kl_horizon
        )
        self.score_transform = core.ScoreTransform(cfg.score_clip, cfg.score_scale, cfg.score_norm)

    # --- one PPO step ---
    def ppo_step(self) -> dict | None:
        """One step on this rank's prompts; None when the batch was skipped (non-finite)."""
        cfg, parallel = self.cfg, self.parallel
        self.timer = Timer()
        started = time.perf_counter()
        seed = step_seed(cfg.seed, self.step, self.rank)
        # 1-2. generate the responses and score their text
        prompts = self.prompts.draw(self.step, cfg.batch_size, self.rank, self.world_size)
        rollout = self.collect(prompts, 1, seed + 7919 * self.retries)
        # 3. log-probs, values and reference log-probs, in the micro-batches of the first update epoch
        generator = torch.Generator().manual_seed(seed + 1)
        first_order = torch.randperm(cfg.batch_size, generator=generator)
        score(rollout, self.policy, partition(first_order, micro_batch_size(cfg)), True, self.timer)
        if not parallel.all_true(bool(torch.isfinite(rollout.scores).all() and torch.isfinite(rollout.logprobs).all())):
            self.nonfinite("reward or log-probs")
            return None
        # 4-5. rewards, advantages and the clipped updates. Score statistics (ppo.score_norm) are taken over every
        # rank's scores, so all ranks normalise alike and the checkpoint holds one set.
        all_scores = parallel.gather(rollout.scores.float())
        moments = self.score_transform.state_dict()  # put back if the batch is skipped: it taught nothing
        scores = self.score_transform(all_scores).to(rollout.scores.device)
        scores = scores[self.rank * cfg.batch_size : (self.rank + 1) * cfg.batch_size]
        kl_coef = self.kl_ctl.value
        opt = Optimisation(self.module, self.params, self.optimizer, parallel)
        stats = optimise(rollout, scores, opt, cfg, kl_coef, first_order, generator, self.timer)
        if stats["applied_minibatches"] == 0:  # every mini-batch was non-finite: nothing was learned
            self.score_transform.load_state_dict(moments)
            self.nonfinite("loss or gradient")
            return None
        self.nonfinite_in_a_row = self.retries = 0
        self.nonfinite_total += stats["skipped_minibatches"]
        # 6. KL controller: Ziegler et al. use the batch's mean per-sequence KL and the number of samples seen.
        self.kl_ctl.update(stats["kl"], cfg.batch_size * self.world_size)
        self.step += 1
        elapsed = time.perf_counter() - started
        all_positive = parallel.gather(rollout.positive.float().to(all_scores.device))
        row = {
            "step": self.step,
            **self.reward_metrics(rollout, all_scores, all_positive),
            "kl": stats["kl"],
            "kl_coef": kl_coef,
            **{k: stats[k] for k in ("policy_loss", "value_loss", "clipfrac", "approx_kl", "ratio", "vf_clipfrac")},
            **self.step_metrics(rollout, stats, elapsed),
        }
        self.log.metrics(row)
        if self.step % cfg.sample_every == 0 or self.step == 1:
            self.log.samples(self.step, rollout.prompts, rollout.responses, rollout.scores.tolist())
        return row

    train_step = ppo_step

    # --- checkpoints ---
    def extra_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        return {"value_head": self.policy.value_head.state_dict()}

    def extra_state(self) -> dict:
        return {"kl_controller": self.kl_ctl.state_dict(), "score_transform": self.score_transform.state_dict()}

    def load_extra(self, tensors: dict[str, dict[str, torch.Tensor]], state: dict) -> None:
        device = modeling.device()
        self.policy.value_head.load_state_dict({k: v.to(device) for k, v in tensors["value_head"].items()})
        self.kl_ctl.load_state_dict(state["kl_controller"])
        self.score_transform.load_state_dict(state["score_transform"])
