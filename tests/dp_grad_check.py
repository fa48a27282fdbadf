"""Run by tests/test_distributed.py under `accelerate launch` on two processes: the data-parallel gradient of PPO and
GRPO is the global token mean's (each rank's token-mean gradient weighted by its share of all ranks' response tokens:
not the plain mean of the ranks' token means, not their sum, not one rank's own), with PPO also under the reentrant
activation checkpointing the gpt-neox-20b recipe uses; and the logged update statistics are every rank's.

Each rank takes its own rollout, computes the gradient of its own mini-batch alone (no collective), then the update
path computes it again through DDP; the latter must equal the token-weighted mean of both ranks' own gradients.
"""

from __future__ import annotations

import sys
from contextlib import nullcontext
from pathlib import Path

import torch

from rlhf.config import load_recipe
from rlhf.grpo import core as grpo_core
from rlhf.grpo import update as grpo_update
from rlhf.grpo.trainer import GRPOTrainer
from rlhf.ppo import update as ppo_update
from rlhf.ppo.trainer import PPOTrainer
from rlhf.rl import step as rl_step
from rlhf.rl.parallel import Parallel
from rlhf.rl.prompts import step_seed
from rlhf.rl.rollout import collect, partition, score
from rlhf.rl.telemetry import Timer
from rlhf.rl.update import Optimisation
from rlhf.runs import Run


class Recorder(torch.optim.SGD):
    """SGD at learning rate 0 that keeps the gradients it is handed."""

    def __init__(self, params):
        super().__init__(params, lr=0.0)
        self.seen: list[torch.Tensor] = []

    def step(self, closure=None):
        self.seen.append(torch.cat([p.grad.detach().flatten() for g in self.param_groups for p in g["params"]]))
        return super().step(closure)


class Alone:
    """The collectives of one process: this rank's gradient, untouched by the others."""

    distributed = False
    world_size = 1

    def no_sync(self, module, sync):
        return nullcontext()

    def all_true(self, flag):
        return flag

    def mean(self, value):
        return value

    def sum(self, value):
        return value

    def means(self, values):
        return values


def check(name: str, trainer, parallel: Parallel, algorithm: str) -> None:
    torch.manual_seed(0)  # the same non-zero adapter on both ranks, so the policy differs from the reference
    for n, p in trainer.model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.05)
    cfg = trainer.cfg
    seed = step_seed(cfg.seed, 0, parallel.rank)
    prompts = trainer.prompts.batch(0, cfg.batch_size, parallel.rank, parallel.world_size)
    if algorithm == "grpo":
        prompts = [p for p in prompts for _ in range(cfg.group_size)]
    rollout = collect(trainer.policy, trainer.tokenizer, trainer.reward, prompts, cfg.generation, 8, seed, Timer())
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed))
    update = ppo_update if algorithm == "ppo" else grpo_update
    score(rollout, trainer.policy, partition(order, update.micro_batch_size(cfg)), algorithm == "ppo", Timer())

    grads, stats = {}, {}
    for side, module, group in (("own", trainer.policy, Alone()), ("ddp", trainer.module, parallel)):
        recorder = Recorder(trainer.params)
        opt = Optimisation(module, trainer.params, recorder, group)
        if algorithm == "ppo":
            stats[side] = update.optimise(
                rollout, rollout.scores.float(), opt, cfg, 0.1, order, torch.Generator(), Timer()
            )
        else:
            advantages = grpo_core.group_advantages(rollout.scores, cfg.group_size, cfg.advantage)
            stats[side] = update.optimise(rollout, advantages, opt, cfg, order, torch.Generator(), Timer())
        grads[side] = recorder.seen[0]
    both = parallel.gather(grads["own"][None])
    tokens = parallel.gather(rollout.response_mask.sum().double()[None])
    assert not torch.allclose(both[0], both[1]), "the ranks' own gradients differ, or this check proves nothing"
    assert tokens[0] != tokens[1], "the ranks' token counts differ, or the token weighting goes untested"
    weighted = (both * (tokens / tokens.sum())[:, None].to(both.dtype)).sum(0)
    assert torch.allclose(grads["ddp"], weighted, rtol=1e-4, atol=1e-7), (grads["ddp"] - weighted).abs().max()
    assert not torch.allclose(grads["ddp"], both.mean(0), rtol=1e-3, atol=1e-6), "the mean of the ranks' token means"
    assert not torch.allclose(grads["ddp"], both.sum(0), rtol=1e-2), "summed, not averaged"
    # The logged statistics are every rank's: the same on both, the mean of what each rank saw alone.
    for key in ("policy_loss", "clipfrac", "approx_kl", "ratio"):
        seen = parallel.gather(torch.tensor([stats["ddp"][key], stats["own"][key]], dtype=torch.float64)[None])
        assert seen[0, 0] == seen[1, 0], (key, seen)
        assert abs(seen[0, 0] - seen[:, 1].mean()) < 1e-9, (key, seen)
    # And the step's response statistics: entropy per response token and length per response, over every rank.
    row = trainer.step_metrics(rollout, stats["ddp"], elapsed=1.0)
    mask = rollout.response_mask.bool()
    parts = torch.stack([torch.where(mask, rollout.entropy, 0.0).sum().double(), mask.sum().double()])
    parts = parallel.gather(parts[None]).sum(0)
    assert abs(row["entropy"] - float(parts[0] / parts[1])) < 1e-6, (row["entropy"], parts)
    assert abs(row["response_len"] - float(parts[1]) / (parallel.world_size * len(prompts))) < 1e-9, row
    print(
        f"rank {parallel.rank}: {name}: gradient is the token-weighted mean of {parallel.world_size} ranks'", flush=True
    )


def main(run_dir: str) -> None:
    parallel = Parallel()
    run = Run(Path(run_dir))
    cases = [
        ("ppo", "ppo", ["ppo.batch_size=8", "ppo.mini_batch_size=8", "ppo.gradient_accumulation_steps=2",
                        "ppo.ppo_epochs=1"]),
        # The gpt-neox-20b recipe's reentrant checkpointing: DDP's all-reduce must still see every LoRA gradient once.
        ("ppo, reentrant checkpointing", "ppo", ["ppo.batch_size=8", "ppo.mini_batch_size=8",
                                                 "ppo.gradient_accumulation_steps=2", "ppo.ppo_epochs=1",
                                                 "ppo.gradient_checkpointing=true"]),
        ("grpo", "grpo", ["grpo.batch_size=2", "grpo.group_size=4", "grpo.mini_batch_size=8",
                          "grpo.gradient_accumulation_steps=2", "grpo.epochs=1"]),
    ]  # fmt: skip
    for name, algorithm, overrides in cases:
        recipe, reward = rl_step.prepare(load_recipe("quickstart", overrides), run, None, False, False, algorithm)
        trainer = (PPOTrainer if algorithm == "ppo" else GRPOTrainer)(recipe, run, reward, parallel)
        trainer.setup()
        check(name, trainer, parallel, algorithm)


if __name__ == "__main__":
    main(sys.argv[1])
