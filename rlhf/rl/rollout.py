"""A rollout: generate responses to prompts, score the text with the reward, and take the log-probs RL needs.

1. generate, `rollout_batch_size` sequences at a time (KV cache on, checkpointing off, eval mode)
2. decode prompt + response and score them with the reward: a classifier reads the text (its own tokenizer), a
   callable the completions with their prompts' dataset rows (TRL's convention), a reward adapter on the policy's own
   base (rlhf reward) the token ids themselves
3. log-probs of the policy (and values, for PPO) and of the reference (adapter disabled), without grad, in train mode
   and in the exact micro-batches the first update epoch will use (see `score`)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from rlhf.config import GenerationConfig
from rlhf.rewards import RESERVED, Samples, score_samples
from rlhf.rl.policy import Policy
from rlhf.rl.prompts import left_pad, pad_left, pad_right
from rlhf.rl.telemetry import Timer


@dataclass
class Rollout:
    query: Tensor  # [B, P] left-padded prompts
    query_mask: Tensor
    response: Tensor  # [B, R] right-padded responses
    response_mask: Tensor  # [B, R] float, 1.0 on response tokens that count
    prompts: list[str]
    responses: list[str]
    scores: Tensor  # [B] raw reward scores
    positive: Tensor  # [B] bool
    logprobs: Tensor | None = None  # [B, R] policy, as the update will compute it
    ref_logprobs: Tensor | None = None  # [B, R] reference (adapter disabled)
    values: Tensor | None = None  # [B, R] PPO only
    entropy: Tensor | None = None  # [B, R]
    components: dict[str, Tensor] = field(default_factory=dict)  # [B] a callable's own values, NaN: does not apply

    @property
    def texts(self) -> list[str]:
        return [p + r for p, r in zip(self.prompts, self.responses)]

    @property
    def input_ids(self) -> Tensor:
        return torch.cat([self.query, self.response], 1)

    @property
    def attention_mask(self) -> Tensor:
        return torch.cat([self.query_mask, self.response_mask.long()], 1)


@torch.no_grad()
def generate(
    policy: Policy,
    tokenizer,
    prompts: list[list[int]],
    gen: GenerationConfig,
    rollout_batch_size: int,
    seed: int,
    timer: Timer,
    greedy: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(query, query_mask, response, response_mask) for the prompts: prompts left-padded to one width P, responses
    right-padded to R. Each response runs to its own drawn length in [min_new_tokens, max_new_tokens]."""
    device = next(policy.parameters()).device
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(gen.min_new_tokens, gen.max_new_tokens + 1, (len(prompts),), generator=g)
    pad = tokenizer.pad_token_id
    eos = tokenizer.eos_token_id if gen.stop_at_eos else None
    policy.eval()  # no checkpointing and a live KV cache while generating
    chunks = []
    for start in range(0, len(prompts), rollout_batch_size):
        sub = prompts[start : start + rollout_batch_size]
        sub_lengths = lengths[start : start + len(sub)]
        query, qmask = left_pad(sub, pad, device)
        t = time.perf_counter()
        response, rmask, _ = policy.generate(query, qmask, int(sub_lengths.max()), eos, greedy=greedy)
        within = torch.arange(response.shape[1], device=device)[None] < sub_lengths[:, None].to(device)
        rmask = rmask * within.long()
        response = torch.where(rmask.bool(), response, torch.full_like(response, pad))
        timer.add("generate", t)
        chunks.append((query, qmask, response, rmask))
    width_p = max(c[0].shape[1] for c in chunks)
    width_r = max(c[2].shape[1] for c in chunks)
    return (
        torch.cat([pad_left(c[0], width_p, pad) for c in chunks]),
        torch.cat([pad_left(c[1], width_p, 0) for c in chunks]),
        torch.cat([pad_right(c[2], width_r, pad) for c in chunks]),
        torch.cat([pad_right(c[3], width_r, 0) for c in chunks]),
    )


def decode(tokenizer, query: Tensor, query_mask: Tensor, response: Tensor, response_mask: Tensor):
    """(prompt texts, response texts); the reward model sees prompt + response, re-tokenized with its own tokenizer."""
    pad = tokenizer.pad_token_id
    prompts = tokenizer.batch_decode(query.masked_fill(query_mask == 0, pad), skip_special_tokens=True)
    responses = [
        tokenizer.decode(r[m.bool()].tolist(), skip_special_tokens=True) for r, m in zip(response, response_mask)
    ]
    return prompts, responses


def collect(
    policy: Policy,
    tokenizer,
    reward,
    prompts: list[list[int]],
    gen: GenerationConfig,
    rollout_batch_size: int,
    seed: int,
    timer: Timer,
    rows: list[dict] | None = None,
    prompt_column: str = "prompt",
    greedy: bool = False,
) -> Rollout:
    """Steps 1 and 2: responses and their rewards (log-probs come from `score`). `rows[i]` is prompt i's dataset row:
    its prompt (as the dataset holds it) and its other columns go to the reward with the sample."""
    query, qmask, response, rmask = generate(policy, tokenizer, prompts, gen, rollout_batch_size, seed, timer, greedy)
    t = time.perf_counter()
    prompt_texts, response_texts = decode(tokenizer, query, qmask, response, rmask)
    samples = Samples(
        prompts=[row[prompt_column] for row in rows] if rows is not None else list(prompt_texts),
        completions=response_texts,
        texts=[p + r for p, r in zip(prompt_texts, response_texts)],
        completion_ids=[r[m.bool()].tolist() for r, m in zip(response, rmask)],
        columns={k: [row[k] for row in rows] for k in rows[0] if k != prompt_column and k not in RESERVED}
        if rows
        else {},
        input_ids=torch.cat([query, response], 1),
        attention_mask=torch.cat([qmask, rmask], 1),
    )
    scored = score_samples(reward, samples)
    timer.add("reward", t)
    return Rollout(
        query, qmask, response, rmask.float(), prompt_texts, response_texts,
        scored.scores.to(query.device), scored.positive, components=scored.components,
    )  # fmt: skip


def partition(order: Tensor, size: int) -> list[Tensor]:
    """Consecutive chunks of `order`: the micro-batches of one update epoch."""
    return [order[i : i + size] for i in range(0, len(order), size)]


@torch.no_grad()
def score(rollout: Rollout, policy: Policy, batches: list[Tensor], values: bool, timer: Timer) -> None:
    """Step 3: fill the rollout's policy and reference log-probs (and values, entropy), batch by batch.

    `batches` should be the micro-batches of the first update epoch: LLM.int8 picks its fp16 outlier columns per batch,
    so a row's log-prob depends on which rows share its forward; scored in exactly the update's batches, in the mode
    the update runs in (train: int8 layers and checkpointing differ between modes; dropout is off), the PPO ratio of
    the first mini-batch starts at exactly 1.
    """
    t = time.perf_counter()
    ids, mask, width_r = rollout.input_ids, rollout.attention_mask, rollout.response.shape[1]
    n = ids.shape[0]
    logprobs = torch.zeros(n, width_r, device=ids.device)
    ref_logprobs, entropy = torch.zeros_like(logprobs), torch.zeros_like(logprobs)
    vals = torch.zeros_like(logprobs) if values else None
    policy.train()
    batches = [idx.to(ids.device) for idx in batches]
    for idx in batches:
        own = policy.score(ids[idx], mask[idx], width_r, values=values, entropy=True)
        logprobs[idx], entropy[idx] = own.logprobs, own.entropy
        if values:
            vals[idx] = own.values
    # One switch of the adapter for all micro-batches: peft's disable_adapter() walks the whole model each time.
    with policy.reference():
        for idx in batches:
            ref_logprobs[idx] = policy.score(ids[idx], mask[idx], width_r, values=False).logprobs
    rollout.logprobs, rollout.ref_logprobs, rollout.values, rollout.entropy = logprobs, ref_logprobs, vals, entropy
    timer.add("forward", t)
