"""PPO maths checked against numbers worked out by hand (the arithmetic is in the comments)."""

import math

import pytest
import torch

from rlhf.ppo.core import (
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    ScoreTransform,
    compute_gae,
    compute_rewards,
    make_kl_controller,
    value_loss,
)
from rlhf.rl.core import (
    entropy_from_logits,
    exact_div,
    kl_estimate,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_loss,
)

LN2, LN3 = math.log(2.0), math.log(3.0)


def t(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def close(actual: torch.Tensor, expected: torch.Tensor | list, atol: float = 1e-6) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=atol, rtol=1e-5)


# --------------------------------------------------------------------------------------------------------------------
# exact_div


def test_exact_div_returns_quotient_and_names_both_values():
    assert exact_div(256, 16, "batch_size / mini_batch_size") == 16
    with pytest.raises(ValueError, match=r"^batch_size \(6\) must be exactly divisible by mini_batch_size \(4\)$"):
        exact_div(6, 4, "batch_size / mini_batch_size")
    with pytest.raises(ValueError, match=r"mini_batch_size \(0\) must be a positive integer"):
        exact_div(6, 0, "batch_size / mini_batch_size")


# --------------------------------------------------------------------------------------------------------------------
# log-probs and entropy


def test_logprobs_by_hand():
    # logits [0, ln 3, -inf] -> p = [1/4, 3/4, 0]; logits [0, 0, ln 2] -> p = [1/4, 1/4, 1/2].
    logits = torch.tensor([[[0.0, LN3, -math.inf], [0.0, 0.0, LN2]]])
    tokens = torch.tensor([[1, 2]])
    close(logprobs_from_logits(logits, tokens), [[math.log(3 / 4), math.log(1 / 2)]])
    close(logprobs_from_logits(logits, torch.tensor([[0, 0]])), [[math.log(1 / 4), math.log(1 / 4)]])


@pytest.mark.parametrize("chunk_tokens", [1, 3, 5, 7, 512])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_logprobs_match_log_softmax_gather(dtype: torch.dtype, chunk_tokens: int):
    g = torch.Generator().manual_seed(0)
    # 3 x 8 positions, sliced from a longer sequence as the PPO loop does: a non-contiguous view.
    full = (torch.randn(3, 9, 50, generator=g) * 4).to(dtype)
    logits = full[:, :-1]
    tokens = torch.randint(0, 50, (3, 8), generator=g)
    expected = torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    actual = logprobs_from_logits(logits, tokens, chunk_tokens=chunk_tokens)
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk_tokens", [2, 512])
def test_logprobs_gradient_matches_autograd_of_log_softmax(chunk_tokens: int):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 7, (2, 5), generator=g)
    weights = torch.randn(2, 5, generator=g, dtype=torch.float64)

    (logprobs_from_logits(logits, tokens, chunk_tokens=chunk_tokens) * weights).sum().backward()
    ours = logits.grad.clone()
    logits.grad = None
    (torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1) * weights).sum().backward()
    torch.testing.assert_close(ours, logits.grad, atol=1e-6, rtol=1e-5)


def test_logprobs_backward_keeps_no_full_fp32_copy():
    # bf16 logits [4, 16, 1000]: a full fp32 copy is 256 kB. What autograd keeps for backward must be the bf16 logits
    # (128 kB), the tokens and the [4, 16] logsumexp -- nothing the size of an fp32 [B, T, V] tensor.
    logits = torch.randn(4, 16, 1000).to(torch.bfloat16).requires_grad_()
    tokens = torch.randint(0, 1000, (4, 16))
    saved: list[torch.Tensor] = []

    def pack(x: torch.Tensor) -> torch.Tensor:
        saved.append(x)
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        logprobs_from_logits(logits, tokens, chunk_tokens=16).sum().backward()
    fp32_full = 4 * 16 * 1000 * 4
    assert sum(x.numel() * x.element_size() for x in saved if x.dtype == torch.float32) < fp32_full / 100
    assert logits.grad.dtype == torch.bfloat16 and torch.isfinite(logits.grad.float()).all()


def test_entropy_bonus_keeps_no_fp32_copy_for_backward():
    """An entropy bonus (entropy with grad) keeps for backward the logits the caller holds anyway and two [B, T]
    tensors: none of the three fp32 [B, T, V] tensors plain autograd would keep (log_softmax, its exp, their product),
    which the budget does not count."""
    logits = torch.randn(4, 16, 1000).to(torch.bfloat16).requires_grad_()
    saved: list[torch.Tensor] = []

    def pack(x: torch.Tensor) -> torch.Tensor:
        saved.append(x)
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        entropy = entropy_from_logits(logits, chunk_tokens=16)
    fp32_full = 4 * 16 * 1000 * 4
    assert sum(x.numel() * x.element_size() for x in saved if x.dtype == torch.float32) < fp32_full / 100
    entropy.sum().backward()
    assert logits.grad.dtype == torch.bfloat16 and torch.isfinite(logits.grad.float()).all()


def test_entropy_by_hand():
    # p = [1/4, 1/4, 1/2]: H = 2 * (1/4) ln 4 + (1/2) ln 2 = ln 2 + 0.5 ln 2 = 1.5 ln 2.
    # Uniform over 3: H = ln 3. One-hot (others -inf): H = 0.
    logits = torch.tensor([[[0.0, 0.0, LN2], [5.0, 5.0, 5.0], [0.0, -math.inf, -math.inf]]])
    close(entropy_from_logits(logits), [[1.5 * LN2, LN3, 0.0]])


@pytest.mark.parametrize("chunk_tokens", [1, 4, 512])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_entropy_matches_reference_formula(dtype: torch.dtype, chunk_tokens: int):
    g = torch.Generator().manual_seed(2)
    logits = (torch.randn(3, 6, 40, generator=g) * 3).to(dtype)
    logp = torch.log_softmax(logits.float(), dim=-1)
    expected = -(logp.exp() * logp).sum(-1)
    actual = entropy_from_logits(logits, chunk_tokens=chunk_tokens)
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_entropy_is_differentiable():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    entropy_from_logits(logits, chunk_tokens=2).sum().backward()
    ours = logits.grad.clone()
    logits.grad = None
    logp = torch.log_softmax(logits, -1)
    (-(logp.exp() * logp).sum(-1)).sum().backward()
    torch.testing.assert_close(ours, logits.grad, atol=1e-5, rtol=1e-5)
    # A masked-out (-inf) logit keeps both the entropy and its gradient finite.
    masked = torch.tensor([[[0.0, 1.0, -math.inf]]], requires_grad=True)
    entropy_from_logits(masked).sum().backward()
    assert torch.isfinite(masked.grad).all()


# --------------------------------------------------------------------------------------------------------------------
# masked statistics

X = t([1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -7.0, 0.0])
MASK = t([1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0])


def test_masked_mean_by_hand():
    # Real values 1, 2, 3 | 4, 5: overall (1+2+3+4+5)/5 = 3; per row 6/3 = 2 and 9/2 = 4.5.
    close(masked_mean(X, MASK), 3.0)
    close(masked_mean(X, MASK, dim=1), [2.0, 4.5])


def test_masked_var_by_hand():
    # Deviations from 3: -2, -1, 0, 1, 2 -> sum of squares 10; unbiased 10/4 = 2.5, biased 10/5 = 2.
    close(masked_var(X, MASK), 2.5)
    close(masked_var(X, MASK, unbiased=False), 2.0)
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(X, t([1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]))


def test_masked_whiten_by_hand():
    # (x - 3) / sqrt(2.5) on real tokens, 0 on padding; without shifting the mean, 3 is added back.
    s = math.sqrt(2.5)
    close(masked_whiten(X, MASK), [[-2 / s, -1 / s, 0.0, 0.0], [1 / s, 2 / s, 0.0, 0.0]], atol=1e-6)
    close(masked_whiten(X, MASK, shift_mean=False), [[3 - 2 / s, 3 - 1 / s, 3.0, 0.0], [3 + 1 / s, 3 + 2 / s, 0, 0]])


def test_masked_functions_ignore_padded_values():
    other = X.clone()
    other[MASK == 0] = torch.tensor([math.inf, math.nan, -1e6])
    close(masked_mean(other, MASK), masked_mean(X, MASK))
    close(masked_mean(other, MASK, dim=1), masked_mean(X, MASK, dim=1))
    close(masked_var(other, MASK), masked_var(X, MASK))
    close(masked_whiten(other, MASK), masked_whiten(X, MASK))


# --------------------------------------------------------------------------------------------------------------------
# KL estimators


def test_kl_estimates_by_hand():
    # logp - ref = [1, -1, 0]. k3 with r = exp(ref - logp) = [1/e, e, 1]:
    # (1/e - 1) - (-1) = 1/e;  (e - 1) - 1 = e - 2;  0.
    logp, ref = t([-1.0, -2.0, -0.5]), t([-2.0, -1.0, -0.5])
    close(kl_estimate(logp, ref, "k1"), [[1.0, -1.0, 0.0]])
    close(kl_estimate(logp, ref, "k3"), [[math.exp(-1), math.e - 2, 0.0]])
    close(kl_estimate(logp, ref, "abs"), [[1.0, 1.0, 0.0]])
    close(kl_estimate(logp, ref, "mse"), [[0.5, 0.5, 0.0]])


def test_kl_unknown_kind_quotes_value_and_allowed():
    with pytest.raises(ValueError, match=r"'k2'.*k1, k3, abs, mse"):
        kl_estimate(t([0.0]), t([0.0]), "k2")


def test_kl_k3_never_negative():
    g = torch.Generator().manual_seed(4)
    # Differences from 1e-9 to 10 in both directions, where exp(x) - 1 - x would round below zero.
    magnitudes = torch.logspace(-9, 1, 2000)
    logp = -torch.rand(2000, generator=g) * 5
    for sign in (1.0, -1.0):
        assert (kl_estimate(logp, logp + sign * magnitudes, "k3") >= 0).all()
    assert (kl_estimate(torch.randn(4000, generator=g) * 3, torch.randn(4000, generator=g) * 3, "k3") >= 0).all()


# --------------------------------------------------------------------------------------------------------------------
# score transform and running moments


def test_running_moments_by_hand_and_over_two_batches():
    m = RunningMoments()
    m.update(torch.tensor([1.0, 2.0, 3.0]))
    m.update(torch.tensor([4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0]))
    # 1..10: mean 5.5; sum of squared deviations 2 * (0.5^2 + 1.5^2 + 2.5^2 + 3.5^2 + 4.5^2) = 82.5; /9 = 9.1667.
    assert m.count == 10
    assert m.mean == pytest.approx(5.5)
    assert m.var == pytest.approx(82.5 / 9)


def test_running_moments_equal_stats_of_concatenation():
    g = torch.Generator().manual_seed(5)
    batches = [torch.randn(n, generator=g) * 3 + 7 for n in (5, 1, 64, 17)]
    m = RunningMoments()
    for b in batches:
        m.update(b)
    everything = torch.cat(batches).double()
    assert m.mean == pytest.approx(float(everything.mean()), rel=1e-9)
    assert m.var == pytest.approx(float(everything.var()), rel=1e-9)
    assert m.std == pytest.approx(float(everything.std()), rel=1e-9)


def test_running_moments_state_dict_resumes_identically():
    a, b = RunningMoments(), RunningMoments()
    a.update(torch.tensor([1.0, 4.0]))
    b.load_state_dict(a.state_dict())
    a.update(torch.tensor([2.0, 9.0, 3.0]))
    b.update(torch.tensor([2.0, 9.0, 3.0]))
    assert b.state_dict() == a.state_dict()
    assert b.count == 5 and b.mean == pytest.approx(19 / 5)


def test_score_transform_clip_and_scale_by_hand():
    scores = torch.tensor([-3.0, 0.5, 7.0])
    close(ScoreTransform(clip=2.0)(scores), [-2.0, 0.5, 2.0])
    # scale first: [-1.5, 0.25, 3.5], then clip at 2: [-1.5, 0.25, 2.0].
    close(ScoreTransform(clip=2.0, scale=0.5)(scores), [-1.5, 0.25, 2.0])
    close(ScoreTransform()(scores), scores)


def test_score_transform_running_normalisation_by_hand():
    st = ScoreTransform(normalize=True)
    # Batch [1, 2, 3]: mean 2, std 1 -> [-1, 0, 1].
    close(st(torch.tensor([1.0, 2.0, 3.0])), [-1.0, 0.0, 1.0])
    resumed = ScoreTransform(normalize=True)
    resumed.load_state_dict(st.state_dict())
    # Then [4, 5]: running stats over 1..5 are mean 3, std sqrt(2.5) -> [1, 2] / 1.5811.
    s = math.sqrt(2.5)
    close(st(torch.tensor([4.0, 5.0])), [1 / s, 2 / s])
    close(resumed(torch.tensor([4.0, 5.0])), [1 / s, 2 / s])
    # Without shifting the mean: only divided by the running std.
    close(ScoreTransform(normalize=True, shift_mean=False)(torch.tensor([1.0, 2.0, 3.0])), [1.0, 2.0, 3.0])


# --------------------------------------------------------------------------------------------------------------------
# rewards and advantages


def test_compute_rewards_by_hand():
    logp = t([-1.0, -0.5, -2.0, -9.0], [-1.0, -1.0, -9.0, -9.0])
    ref = t([-1.5, -0.5, -1.0, 0.0], [-2.0, -0.5, 0.0, 0.0])
    scores = torch.tensor([1.0, -2.0])
    # k1 on real tokens: [0.5, 0, -1, pad] and [1, -0.5, pad, pad]; times -0.2: [-0.1, 0, 0.2] and [-0.2, 0.1].
    # The score goes on the last real token: row 0 at t=2 (0.2 + 1 = 1.2), row 1 at t=1 (0.1 - 2 = -1.9).
    rewards, kl = compute_rewards(scores, logp, ref, MASK, kl_coef=0.2)
    close(kl, [[0.5, 0.0, -1.0, 0.0], [1.0, -0.5, 0.0, 0.0]])
    close(rewards, [[-0.1, 0.0, 1.2, 0.0], [-0.2, -1.9, 0.0, 0.0]])


def test_compute_rewards_kl_kind_and_uneven_masks():
    # k3 of diff 1 is 1/e. Masks: one real token at t=1 only (left and right padding) and a full row.
    logp, ref = t([0.0, 1.0, 0.0], [1.0, 1.0, 1.0]), t([0.0, 0.0, 0.0], [0.0, 0.0, 0.0])
    mask = t([0.0, 1.0, 0.0], [1.0, 1.0, 1.0])
    rewards, kl = compute_rewards(torch.tensor([3.0, 5.0]), logp, ref, mask, kl_coef=1.0, kl_kind="k3")
    e = math.exp(-1)
    close(kl, [[0.0, e, 0.0], [e, e, e]])
    close(rewards, [[0.0, 3.0 - e, 0.0], [-e, -e, 5.0 - e]])
    with pytest.raises(ValueError, match="at least one real token"):
        compute_rewards(torch.tensor([1.0]), t([0.0, 0.0]), t([0.0, 0.0]), t([0.0, 0.0]), kl_coef=0.1)


def test_compute_gae_by_hand_gamma_1():
    # gamma = 1, lam = 0.95, three real tokens and a padded 4th (whose value 99 and reward 50 must be ignored):
    # t=2: delta = 1 + 1*0 - 3 = -2              A2 = -2
    # t=1: delta = 0 + 1*3 - 2 = 1               A1 = 1 + 0.95 * -2 = -0.9
    # t=0: delta = 0 + 1*2 - 1 = 1               A0 = 1 + 0.95 * -0.9 = 0.145
    # returns = A + V = [1.145, 1.1, 1.0], 0 on padding.
    values, rewards, mask = t([1.0, 2.0, 3.0, 99.0]), t([0.0, 0.0, 1.0, 50.0]), t([1.0, 1.0, 1.0, 0.0])
    adv, ret = compute_gae(values, rewards, mask, gamma=1.0, lam=0.95, whiten=False)
    close(adv, [[0.145, -0.9, -2.0, 0.0]])
    close(ret, [[1.145, 1.1, 1.0, 0.0]])


def test_compute_gae_by_hand_discounted_and_with_a_hole():
    # Row 0, gamma = lam = 0.5, values [2, 4], rewards [1, 3]:
    #   t=1: delta = 3 - 4 = -1, A1 = -1;  t=0: delta = 1 + 0.5*4 - 2 = 1, A0 = 1 + 0.25 * -1 = 0.75.
    # Row 1 with a padded position in the middle: the recursion skips it, so t=0 sees t=2 as "next":
    #   t=2: delta = 1 - 2 = -1, A2 = -1;  t=0: delta = 0 + 0.5*2 - 1 = 0, A0 = 0 + 0.25 * -1 = -0.25.
    values = t([2.0, 4.0, 0.0], [1.0, 7.0, 2.0])
    rewards = t([1.0, 3.0, 0.0], [0.0, 5.0, 1.0])
    mask = t([1.0, 1.0, 0.0], [1.0, 0.0, 1.0])
    adv, ret = compute_gae(values, rewards, mask, gamma=0.5, lam=0.5, whiten=False)
    close(adv, [[0.75, -1.0, 0.0], [-0.25, 0.0, -1.0]])
    close(ret, [[2.75, 3.0, 0.0], [0.75, 0.0, 1.0]])


def test_compute_gae_whitens_advantages_over_real_tokens_but_not_returns():
    values, rewards, mask = t([1.0, 2.0, 3.0, 99.0]), t([0.0, 0.0, 1.0, 50.0]), t([1.0, 1.0, 1.0, 0.0])
    raw, raw_ret = compute_gae(values, rewards, mask, gamma=1.0, lam=0.95, whiten=False)
    adv, ret = compute_gae(values, rewards, mask, gamma=1.0, lam=0.95)
    close(adv, masked_whiten(raw, mask))
    close(ret, raw_ret)
    close(masked_mean(adv, mask), 0.0, atol=1e-6)
    close(masked_var(adv, mask), 1.0, atol=1e-5)
    # Padded values and rewards change nothing.
    adv2, ret2 = compute_gae(t([1.0, 2.0, 3.0, -5.0]), t([0.0, 0.0, 1.0, 7.0]), mask, gamma=1.0, lam=0.95)
    close(adv2, adv)
    close(ret2, ret)


# --------------------------------------------------------------------------------------------------------------------
# losses


def test_policy_loss_by_hand_with_clipped_tokens():
    # cliprange 0.2. Four real tokens (row 0 all real, row 1 one real + 2 padding):
    #   a: ratio 1.5, A =  1: unclipped -1.5, clipped -1.2 -> max -1.2 (clipped branch active)
    #   b: ratio 1.0, A = -2: both 2                      -> 2
    #   c: ratio 0.5, A =  1: unclipped -0.5, clipped -0.8 -> -0.5 (below range, but clipping would be optimistic)
    #   e: ratio 0.5, A = -1: unclipped 0.5, clipped 0.8   -> 0.8 (clipped branch active)
    # loss = (-1.2 + 2 - 0.5 + 0.8) / 4 = 0.275; clipfrac = 2/4; mean ratio = (1.5 + 1 + 0.5 + 0.5) / 4 = 0.875;
    # approx_kl = 0.5 * (ln(1.5)^2 + 0 + ln(0.5)^2 + ln(0.5)^2) / 4.
    old = t([-1.0, -2.0, -0.5], [-1.0, -3.0, -3.0])
    ratios = t([1.5, 1.0, 0.5], [0.5, 4.0, 0.01])
    logp = (old + ratios.log()).requires_grad_()
    adv = t([1.0, -2.0, 1.0], [-1.0, 100.0, -100.0])
    mask = t([1.0, 1.0, 1.0], [1.0, 0.0, 0.0])
    loss, stats = policy_loss(logp, old, adv, mask, cliprange=0.2)
    close(loss.detach(), 0.275)
    close(stats["clipfrac"], 0.5)
    close(stats["ratio"], 0.875)
    close(stats["approx_kl"], 0.5 * (math.log(1.5) ** 2 + 2 * math.log(0.5) ** 2) / 4)
    # Gradient: d(-A * ratio)/dlogp = -A * ratio on unclipped tokens, / 4 tokens; 0 where clipped or padded.
    # b: 2 * 1 / 4 = 0.5;  c: -1 * 0.5 / 4 = -0.125.
    loss.backward()
    close(logp.grad, [[0.0, 0.5, -0.125], [0.0, 0.0, 0.0]])


def test_value_loss_by_hand_with_a_clipped_token():
    # cliprange_value 0.2:
    #   a: v 1.5, old 1.0, R 2.0: clipped v 1.2; (1.5-2)^2 = 0.25 < (1.2-2)^2 = 0.64 -> 0.64 (clipped branch active)
    #   b: v 1.1, old 1.0, R 1.0: within range; 0.01
    #   d: v 0.5, old 1.0, R 2.0: clipped v 0.8; (0.5-2)^2 = 2.25 > (0.8-2)^2 = 1.44 -> 2.25
    # loss = 0.5 * (0.64 + 0.01 + 2.25) / 3 = 0.48333; vf_clipfrac = 1/3.
    values = t([1.5, 1.1, 0.5, 9.0]).requires_grad_()
    old, returns, mask = t([1.0, 1.0, 1.0, 0.0]), t([2.0, 1.0, 2.0, -9.0]), t([1.0, 1.0, 1.0, 0.0])
    loss, stats = value_loss(values, old, returns, mask, cliprange_value=0.2)
    close(loss.detach(), 0.5 * 2.9 / 3)
    close(stats["vf_clipfrac"], 1 / 3)
    # Gradient 0.5 * 2 * (v - R) / 3 where unclipped: b 0.1 / 3, d -1.5 / 3; 0 for the clipped a and the padding.
    loss.backward()
    close(values.grad, [[0.0, 0.1 / 3, -0.5, 0.0]])


# --------------------------------------------------------------------------------------------------------------------
# KL controllers


def test_adaptive_kl_controller_by_hand():
    ctl = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000)
    # kl 12: error 12/6 - 1 = 1, clipped to 0.2; mult = 1 + 0.2 * 256 / 10000 = 1.00512 -> 0.201024.
    ctl.update(12.0, n_steps=256)
    assert ctl.value == pytest.approx(0.201024)
    # kl 3: error -0.5, clipped to -0.2; mult = 0.99488 -> 0.201024 * 0.99488 = 0.19999477...
    ctl.update(3.0, n_steps=256)
    assert ctl.value == pytest.approx(0.201024 * 0.99488)
    # kl 6.6: error 0.1 (inside the clip); mult = 1 + 0.1 * 256 / 10000 = 1.00256.
    before = ctl.value
    ctl.update(6.6, n_steps=256)
    assert ctl.value == pytest.approx(before * 1.00256)


def test_kl_controllers_state_dict_and_factory():
    ctl = make_kl_controller("adaptive", 0.2, target=6.0, horizon=10000)
    ctl.update(12.0, 256)
    resumed = make_kl_controller("adaptive", 0.2, target=6.0, horizon=10000)
    resumed.load_state_dict(ctl.state_dict())
    assert resumed.value == ctl.value == pytest.approx(0.201024)

    fixed = make_kl_controller("fixed", 0.05)
    assert isinstance(fixed, FixedKLController)
    fixed.update(100.0, 256)
    assert fixed.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(fixed.state_dict())
    assert other.value == 0.05

    with pytest.raises(ValueError, match=r"'pid'.*adaptive, fixed"):
        make_kl_controller("pid", 0.2)
    with pytest.raises(ValueError, match="target"):
        make_kl_controller("adaptive", 0.2)


def test_padding_far_from_the_old_logprob_gives_finite_gradients():
    """A padded position may hold 0 on one side and a real log-prob on the other (columns cut per micro-batch, and
    later epochs regroup the rows): exp(200) overflows, and its 0 x inf in the backward would be nan."""
    logp = torch.tensor([[-1.0, -2.0, 0.0]], requires_grad=True)
    old = torch.tensor([[-1.1, -1.9, -200.0]])
    mask = torch.tensor([[1, 1, 0]])
    loss, stats = policy_loss(logp, old, torch.tensor([[1.0, -1.0, 1.0]]), mask, 0.2)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all() and logp.grad[0, 2] == 0
    assert all(torch.isfinite(v) for v in stats.values())
    # The real positions are untouched by the padding's value.
    again = logp.detach().clone().requires_grad_(True)
    ref_loss, _ = policy_loss(
        again, old.clone().index_fill_(1, torch.tensor([2]), 0.0), torch.tensor([[1.0, -1.0, 1.0]]), mask, 0.2
    )
    ref_loss.backward()
    assert loss.item() == ref_loss.item() and torch.equal(logp.grad, again.grad)
