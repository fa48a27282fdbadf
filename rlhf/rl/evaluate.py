"""Held-out evaluation of a policy, before and after RL: the same prompts and seed every time.

Reward and positive rate (the reward model's own judgement), the KL to the reference, whether the responses stayed
varied (distinct-1/2, within-response repetition) and fluent (the reference model's perplexity of the responses: the
model before RL judging what RL made of it), and the policy's perplexity on held-out text, through `evaluate` modules
shipped in rlhf/metrics and loaded by path (no hub). With a task reward (a callable, or several), each reward's mean
on its own, sampled at the step's settings and greedily (`reward_NAME`, `reward_NAME_greedy`): a 0/1 reward's mean is
the task accuracy.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rlhf.config import GenerationConfig
from rlhf.rl.policy import Policy
from rlhf.rl.prompts import DatasetPrompts, Prompts
from rlhf.rl.rollout import collect, partition, score
from rlhf.rl.telemetry import Timer


def metric_path(name: str) -> Path:
    return Path(__file__).resolve().parent.parent / "metrics" / name


@torch.no_grad()
def evaluate(
    policy: Policy,
    tokenizer,
    reward,
    prompts: Prompts | DatasetPrompts,
    texts: list[str],
    gen: GenerationConfig,
    rollout_batch_size: int,
    seed: int,
    prompt_column: str = "prompt",
) -> dict:
    import evaluate as hf_evaluate

    if not texts:
        return {}
    batch = prompts.draw(0, len(texts))
    timer = Timer()
    rollout = collect(policy, tokenizer, reward, batch.tokens, gen, rollout_batch_size, seed, timer, batch.rows,
                      prompt_column)  # fmt: skip
    task = {}
    if rollout.components:  # a task reward: its accuracy is also the greedy answer's
        task = reward_means(rollout.components, "")
        greedy = collect(policy, tokenizer, reward, batch.tokens, gen, rollout_batch_size, seed, timer, batch.rows,
                         prompt_column, greedy=True)  # fmt: skip
        task |= {"reward_greedy": greedy.scores.mean().item(), **reward_means(greedy.components, "_greedy")}
        task["binary_rewards"] = [name for name, values in rollout.components.items() if is_binary(values)]
    order = torch.arange(len(batch.tokens))
    score(rollout, policy, partition(order, rollout_batch_size), values=False, timer=timer)
    kl = ((rollout.logprobs - rollout.ref_logprobs) * rollout.response_mask).sum(1)
    reward_stats = hf_evaluate.load(str(metric_path("reward_stats")))
    stats = reward_stats.compute(
        predictions=rollout.scores.tolist(), references=[int(p) for p in rollout.positive.tolist()]
    )
    token_perplexity = hf_evaluate.load(str(metric_path("token_perplexity")))
    diversity = hf_evaluate.load(str(metric_path("diversity"))).compute(predictions=rollout.responses)
    response_nll = -(rollout.ref_logprobs * rollout.response_mask).sum(1)
    return {
        "reward": stats["mean_reward"],
        "positive_rate": stats["positive_rate"],
        "kl": kl.mean().item(),
        "distinct_1": diversity["distinct_1"],
        "distinct_2": diversity["distinct_2"],
        "repetition": diversity["repetition"],
        "response_perplexity": token_perplexity.compute(
            predictions=response_nll.tolist(), references=rollout.response_mask.sum(1).tolist()
        )["perplexity"],
        "perplexity": perplexity(policy, tokenizer, texts, token_perplexity),
        **task,
        "samples": [
            {
                "prompt": p,
                "response": r,
                "reward": s,
                **{k: _value(v[i]) for k, v in (rollout.components or {}).items()},
            }
            for i, (p, r, s) in enumerate(zip(rollout.prompts[:8], rollout.responses[:8], rollout.scores[:8].tolist()))
        ],
    }


def _value(x: torch.Tensor) -> float | None:
    return None if torch.isnan(x) else x.item()


def reward_means(components: dict[str, torch.Tensor], suffix: str) -> dict[str, float | None]:
    """`reward_NAME{suffix}`: each reward's mean over the samples it applies to (None where it applies to none)."""
    out = {}
    for name, values in components.items():
        applies = ~torch.isnan(values)
        out[f"reward_{name}{suffix}"] = values[applies].mean().item() if applies.any() else None
    return out


def is_binary(values: torch.Tensor) -> bool:
    """Every value (where the reward applies) is 0 or 1: the reward says right or wrong, its mean is an accuracy."""
    values = values[~torch.isnan(values)]
    return bool(len(values)) and bool(((values == 0) | (values == 1)).all())


def perplexity(policy: Policy, tokenizer, texts: list[str], metric, n_docs: int = 32, max_tokens: int = 128) -> float:
    """The policy's perplexity on held-out documents: how much RL cost the model as a language model."""
    device = next(policy.parameters()).device
    ids = tokenizer(texts[:n_docs], add_special_tokens=False)["input_ids"]
    nll, count = [], []
    policy.eval()
    for doc in ids:
        doc = doc[:max_tokens]
        if len(doc) < 2:
            continue
        x = torch.tensor([doc], device=device)
        lp = policy.score(x, torch.ones_like(x), len(doc) - 1, values=False).logprobs
        nll.append(-lp.sum().item())
        count.append(len(doc) - 1)
    return metric.compute(predictions=nll, references=count)["perplexity"]
