"""Run by tests/test_distributed.py under `accelerate launch` on two processes: PPO's data-parallel gradient is the
mean of the ranks' gradients (not their sum, not one rank's own).

Each rank takes its own rollout, computes the gradient of its own mini-batch alone (no collective), then the update
path computes it again through DDP; the latter must equal the mean of both ranks' own gradients.
"""

from __future__ import annotations

import sys
from contextlib import nullcontext
from pathlib import Path

import torch

from rlhf.config import load_recipe
from rlhf.ppo import step
from rlhf.ppo.trainer import PPOTrainer
from rlhf.ppo.update import Optimisation, micro_batch_size, optimise
from rlhf.rl.parallel import Parallel
from rlhf.rl.prompts import step_seed
from rlhf.rl.rollout import collect, partition, score
from rlhf.rl.telemetry import Timer
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

    def no_sync(self, module, sync):
        return nullcontext()

    def all_true(self, flag):
        return flag

    def mean(self, value):
        return value


def main(run_dir: str) -> None:
    parallel = Parallel()
    overrides = ["ppo.batch_size=8", "ppo.mini_batch_size=8", "ppo.gradient_accumulation_steps=2", "ppo.ppo_epochs=1"]
    run = Run(Path(run_dir))
    recipe, reward = step.prepare(load_recipe("quickstart", overrides), run, None, False, False)
    trainer = PPOTrainer(recipe, run, reward, parallel)
    trainer.setup()
    torch.manual_seed(0)  # the same non-zero adapter on both ranks, so the policy differs from the reference
    for name, p in trainer.model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    cfg = trainer.cfg
    prompts = trainer.prompts.batch(0, cfg.batch_size, parallel.rank, parallel.world_size)
    seed = step_seed(cfg.seed, 0, parallel.rank)
    rollout = collect(trainer.policy, trainer.tokenizer, trainer.reward, prompts, cfg.generation, 8, seed, Timer())
    order = torch.randperm(cfg.batch_size, generator=torch.Generator().manual_seed(seed))
    score(rollout, trainer.policy, partition(order, micro_batch_size(cfg)), True, Timer())

    grads = {}
    for name, module, group in (("own", trainer.policy, Alone()), ("ddp", trainer.module, parallel)):
        recorder = Recorder(trainer.params)
        opt = Optimisation(module, trainer.params, recorder, group)
        optimise(rollout, rollout.scores.float(), opt, cfg, 0.1, order, torch.Generator(), Timer())
        grads[name] = recorder.seen[0]
    both = parallel.gather(grads["own"][None])
    assert not torch.allclose(both[0], both[1]), "the ranks' own gradients differ, or this check proves nothing"
    mean = both.mean(0)
    assert torch.allclose(grads["ddp"], mean, rtol=1e-4, atol=1e-7), (grads["ddp"] - mean).abs().max()
    assert not torch.allclose(grads["ddp"], both.sum(0), rtol=1e-2), "summed, not averaged"
    print(f"rank {parallel.rank}: gradient is the mean of {parallel.world_size} ranks'", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
