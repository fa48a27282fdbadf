"""RL maths every algorithm shares, as small pure functions on tensors: exact division with a message, log-probs and
entropy from logits in fp32 chunks, masked statistics, the per-token KL estimates and the clipped policy loss (PPO and
GRPO both use it).

Shapes: per-token tensors are [batch, response_len]; `mask` is 1.0 on real response tokens and 0.0 on padding.
Everything is computed in fp32 whatever the input dtype. Losses are to be minimised.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from rlhf.rl.chunks import DEFAULT_CHUNK_TOKENS, chunk_slices

KL_KINDS = ("k1", "k3", "abs", "mse")


def exact_div(a: int, b: int, what: str) -> int:
    """`a // b`, or a ValueError when `b` does not divide `a`; `what` names both, as "batch_size / mini_batch_size"."""
    a_name, _, b_name = (part.strip() for part in what.partition("/"))
    b_name = b_name or "the divisor"
    if b <= 0:
        raise ValueError(f"{b_name} ({b}) must be a positive integer")
    if a % b != 0:
        raise ValueError(f"{a_name} ({a}) must be exactly divisible by {b_name} ({b})")
    return a // b


# ---------------------------------------------------------------------------------------------------------------------
# Log-probs and entropy from logits, chunked


class _TokenLogprobs(torch.autograd.Function):
    """log p(token) = logit[token] - logsumexp(logits), computed and differentiated one fp32 chunk at a time.

    Plain autograd through `logsumexp(chunk.float())` would keep every chunk's fp32 copy alive for the backward pass,
    i.e. a full fp32 [B, T, V] tensor after all. Here only the input logits (held by the caller anyway) and the
    [B, T] logsumexp are saved; the softmax is recomputed chunk by chunk in backward.
    """

    @staticmethod
    def forward(ctx: Any, logits: Tensor, tokens: Tensor, chunk_tokens: int) -> Tensor:
        batch, length, _ = logits.shape
        out = torch.empty(batch, length, dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(out)
        for bs, ts in chunk_slices(batch, length, chunk_tokens):
            chunk = logits[bs, ts].float()
            lse[bs, ts] = torch.logsumexp(chunk, dim=-1)
            out[bs, ts] = chunk.gather(-1, tokens[bs, ts].unsqueeze(-1)).squeeze(-1) - lse[bs, ts]
        ctx.save_for_backward(logits, tokens, lse)
        ctx.chunk_tokens = chunk_tokens
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, None, None]:
        logits, tokens, lse = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)
        for bs, ts in chunk_slices(logits.shape[0], logits.shape[1], ctx.chunk_tokens):
            g = grad_out[bs, ts].float().unsqueeze(-1)
            # d/dx (x[tok] - logsumexp(x)) = onehot(tok) - softmax(x)
            grad = -g * torch.exp(logits[bs, ts].float() - lse[bs, ts].unsqueeze(-1))
            grad.scatter_add_(-1, tokens[bs, ts].unsqueeze(-1), g)
            grad_logits[bs, ts] = grad.to(logits.dtype)
        return grad_logits, None, None


def logprobs_from_logits(logits: Tensor, tokens: Tensor, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> Tensor:
    """fp32 log-prob of each of `tokens` [B, T] under `logits` [B, T, V] (any float dtype); differentiable.

    At most one chunk of `chunk_tokens` x V is ever held in fp32, in forward and in backward.
    """
    if logits.shape[:-1] != tokens.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and tokens {tuple(tokens.shape)} must agree on [batch, time]")
    return _TokenLogprobs.apply(logits, tokens.long(), chunk_tokens)


class _Entropy(torch.autograd.Function):
    """H = -sum p log p per position, computed and differentiated one fp32 chunk at a time.

    Plain autograd would keep each chunk's fp32 log_softmax, its exp and their product for backward: about three fp32
    [B, T, V] tensors for an entropy bonus. Here only the input logits (held by the caller anyway), the [B, T]
    logsumexp and H are saved; backward recomputes p and log p chunk by chunk: dH/dx = -p (log p + H).
    """

    @staticmethod
    def forward(ctx: Any, logits: Tensor, chunk_tokens: int) -> Tensor:
        batch, length, _ = logits.shape
        out = torch.empty(batch, length, dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(out)
        for bs, ts in chunk_slices(batch, length, chunk_tokens):
            chunk = logits[bs, ts].float()
            lse[bs, ts] = torch.logsumexp(chunk, dim=-1)
            logp = chunk - lse[bs, ts].unsqueeze(-1)
            p = logp.exp()
            # 0 * log 0 counts as 0: a -inf logit (a masked-out token) must not turn the entropy into nan.
            out[bs, ts] = -(p * logp.masked_fill(p == 0, 0.0)).sum(-1)
        ctx.save_for_backward(logits, lse, out)
        ctx.chunk_tokens = chunk_tokens
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, None]:
        logits, lse, entropy = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)
        for bs, ts in chunk_slices(logits.shape[0], logits.shape[1], ctx.chunk_tokens):
            logp = logits[bs, ts].float() - lse[bs, ts].unsqueeze(-1)
            p = logp.exp()
            # -g p (log p + H), in place on log p: three fp32 chunks at most; 0 where p = 0 (a -inf logit).
            grad = logp.add_(entropy[bs, ts].unsqueeze(-1)).mul_(p).mul_(-grad_out[bs, ts].float().unsqueeze(-1))
            grad_logits[bs, ts] = grad.masked_fill_(p == 0, 0.0).to(logits.dtype)
        return grad_logits, None


def entropy_from_logits(logits: Tensor, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> Tensor:
    """fp32 entropy [B, T] of the categorical distribution given by `logits` [B, T, V]; differentiable.

    At most one chunk of `chunk_tokens` x V is ever held in fp32, in forward and in backward (an entropy bonus keeps no
    fp32 [B, T, V] tensor for backward).
    """
    return _Entropy.apply(logits, chunk_tokens)


# ---------------------------------------------------------------------------------------------------------------------
# Masked statistics


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `x` over positions where `mask` is 1 (all of them, or along `dim`); an all-zero mask gives nan."""
    keep = mask.bool()
    # where(), not x * mask: a padded inf or nan times 0 is still nan.
    kept = torch.where(keep, x.float(), 0.0)
    if dim is None:
        return kept.sum() / keep.sum()
    return kept.sum(dim) / keep.sum(dim)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of `x` over the positions where `mask` is 1 (Bessel-corrected when `unbiased`)."""
    n = int(mask.bool().sum())
    if n == 0 or (unbiased and n == 1):
        raise ValueError(f"masked_var needs at least {2 if unbiased else 1} unmasked values, got {n}")
    centered = x.float() - masked_mean(x, mask)
    var = masked_mean(centered**2, mask)
    return var * n / (n - 1) if unbiased else var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """`x` scaled to unit variance (and zero mean when `shift_mean`) over real tokens; padded positions become 0.

    Statistics come from real tokens only: padding would otherwise pull the mean towards 0 and shrink the variance by
    a batch-dependent amount, so the same sequence would get different advantages depending on its neighbours.
    """
    mean = masked_mean(x, mask)
    whitened = (x.float() - mean) * torch.rsqrt(masked_var(x, mask) + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, 0.0)


# ---------------------------------------------------------------------------------------------------------------------
# KL and the clipped policy loss


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, kind: str = "k1") -> Tensor:
    """Per-token estimate of KL(policy || reference) from log-probs of tokens sampled from the policy (unmasked).

    "k1": logp - ref (unbiased, can be negative per token); "k3": (r - 1) - log r with r = exp(ref - logp) (unbiased
    and never negative); "abs": |logp - ref|; "mse": 0.5 * (logp - ref)^2.
    """
    diff = logprobs.float() - ref_logprobs.float()
    if kind == "k1":
        return diff
    if kind == "k3":
        # (r - 1) - log r with log r = -diff; expm1 keeps it >= 0 in fp32 where exp(x) - 1 would round below x.
        return torch.expm1(-diff) + diff
    if kind == "abs":
        return diff.abs()
    if kind == "mse":
        return 0.5 * diff.square()
    raise ValueError(f"unknown KL estimator kind {kind!r}; allowed: {', '.join(KL_KINDS)}")


def policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, cliprange: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate loss masked_mean(max(-A * ratio, -A * clip(ratio, 1 - e, 1 + e))), ratio = exp(logp - old).

    Gradients flow into `logprobs` only (old log-probs and advantages are constants of the rollout). Stats (detached
    scalars): clipfrac, the share of real tokens where the clipped branch is the larger (so their gradient is 0);
    approx_kl, masked_mean(0.5 * (logp - old)^2), the "k2" estimate of KL(old || new); ratio, the mean ratio.
    """
    # 0 at padding: what a padded position holds depends on how its micro-batch was cut (`Policy.forward`), and an
    # exp that overflows there would give 0 x inf = nan in the backward, which masked_mean's where() cannot stop.
    log_ratio = torch.where(mask.bool(), logprobs.float() - old_logprobs.detach().float(), 0.0)
    ratio = torch.exp(log_ratio)
    advantages = advantages.detach().float()
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": masked_mean(0.5 * log_ratio.square(), mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, stats
