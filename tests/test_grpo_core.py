"""GRPO and RLOO maths on hand-worked tensors, and agreement with trl 1.16 where it has the same quantity."""

from __future__ import annotations

import math
import types
from collections import defaultdict

import pytest
import torch

from rlhf.grpo.core import (
    STD_EPS,
    group_advantages,
    group_stats,
    grpo_advantages,
    grpo_loss,
    kl_penalised_scores,
    rloo_advantages,
    sequence_kl,
)

# Two groups of four: one with spread (mean 3, deviations -2 -1 0 3, unbiased variance 14/3), one without.
SCORES = torch.tensor([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0])


def test_grpo_advantages_by_hand():
    std = math.sqrt(14 / 3)
    expected = [-2 / (std + STD_EPS), -1 / (std + STD_EPS), 0.0, 3 / (std + STD_EPS), 0.0, 0.0, 0.0, 0.0]
    assert grpo_advantages(SCORES, 4).tolist() == pytest.approx(expected, rel=1e-6)


def test_rloo_advantages_by_hand():
    # sample 1: 1 - (2 + 3 + 6) / 3 = -8/3; sample 2: 2 - 10/3; sample 3: 3 - 9/3; sample 4: 6 - 6/3
    expected = [-8 / 3, -4 / 3, 0.0, 4.0, 0.0, 0.0, 0.0, 0.0]
    assert rloo_advantages(SCORES, 4).tolist() == pytest.approx(expected, rel=1e-6)
    # the leave-one-out baseline is the group mean, rescaled: G / (G - 1) x (s - mean)
    assert torch.allclose(rloo_advantages(SCORES, 4)[:4], 4 / 3 * (SCORES[:4] - 3.0))


def test_advantages_are_per_group_and_by_name():
    """Each group is its own baseline: shifting one group's scores changes nothing, in either group."""
    shifted = SCORES.clone()
    shifted[:4] += 100.0
    for kind in ("grpo", "rloo"):
        assert torch.allclose(group_advantages(shifted, 4, kind), group_advantages(SCORES, 4, kind), atol=1e-5)
    with pytest.raises(ValueError, match="unknown advantage estimator 'ppo'; allowed: grpo, rloo"):
        group_advantages(SCORES, 4, "ppo")


@pytest.mark.parametrize("kind", ["grpo", "rloo"])
def test_a_group_of_equal_scores_gets_exactly_zero(kind):
    """Float rounding of this group's mean is not exact (x - mean = 2.4e-7): still exactly 0, whatever the estimator."""
    x = -3.5619969367980957
    group = torch.full((3,), x)
    assert (group - group.mean()).abs().max() > 0, "the rounding this guards against must show"
    assert group_advantages(torch.cat([group, torch.tensor([0.0, 1.0, 2.0])]), 3, kind)[:3].tolist() == [0.0] * 3


def test_groups_must_be_whole_and_of_two():
    with pytest.raises(ValueError, match=r"rows \(8\) must be exactly divisible by group_size \(3\)"):
        grpo_advantages(SCORES, 3)
    for estimator in (grpo_advantages, rloo_advantages):
        with pytest.raises(ValueError, match=r"group_size \(1\) must be at least 2"):
            estimator(SCORES, 1)


def test_group_stats_by_hand():
    stats = group_stats(SCORES, 4)
    assert stats["group_reward_std"] == pytest.approx(math.sqrt(14 / 3) / 2)  # (std of group 1 + 0) / 2 groups
    assert stats["zero_spread_groups"] == 0.5


# --- KL ---------------------------------------------------------------------------------------------------------

LOGP = torch.tensor([[-1.0, -2.0], [-1.0, 9.0]])  # row 2's second token is padding (a junk value on purpose)
REF = torch.tensor([[-2.0, -1.0], [-1.0, -50.0]])
MASK = torch.tensor([[1.0, 1.0], [1.0, 0.0]])


def test_sequence_kl_and_kl_in_the_reward_by_hand():
    # k1 = logp - ref summed over real tokens: row 1 (1) + (-1) = 0; row 2: 0 (the padded token is ignored)
    assert sequence_kl(LOGP, REF, MASK).tolist() == [0.0, 0.0]
    logp = torch.tensor([[-1.0, -1.5], [-0.5, 9.0]])
    assert sequence_kl(logp, REF, MASK).tolist() == pytest.approx([1.0 - 0.5, 0.5])
    assert kl_penalised_scores(torch.tensor([2.0, 3.0]), logp, REF, MASK, 0.1).tolist() == pytest.approx(
        [2.0 - 0.1 * 0.5, 3.0 - 0.1 * 0.5]
    )


def test_grpo_loss_by_hand_with_a_clipped_token():
    """Row 1 (A = 1): token 1 at ratio 1.5 is clipped to 1.2, token 2 at ratio 1; row 2 (A = -1): one real token at
    ratio 1. Policy part: (-1.2 - 1 + 1) / 3 = -0.4. k3 = exp(ref - logp) - (ref - logp) - 1 per token:
    e^-1 - (-1) - 1 = 0.36788, e^1 - 1 - 1 = 0.71828, 0: mean 0.36205; with beta 0.1 the loss is -0.36379."""
    logp = LOGP.clone().requires_grad_()
    old = LOGP - torch.tensor([[math.log(1.5), 0.0], [0.0, 0.0]])
    loss, stats = grpo_loss(logp, old, REF, torch.tensor([1.0, -1.0]), MASK, 0.2, beta=0.1)
    k3 = (math.exp(-1) + 1 - 1 + math.exp(1) - 1 - 1) / 3
    assert stats["policy_loss"].item() == pytest.approx(-0.4, rel=1e-6)
    assert stats["kl_loss"].item() == pytest.approx(k3, rel=1e-6)
    assert loss.item() == pytest.approx(-0.4 + 0.1 * k3, rel=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(1 / 3)
    loss.backward()
    # The clipped token keeps only the KL's gradient, beta (1 - exp(ref - logp)) / 3; padding gets none.
    assert logp.grad[0, 0].item() == pytest.approx(0.1 * (1 - math.exp(-1)) / 3, rel=1e-5)
    assert logp.grad[0, 1].item() == pytest.approx((-1.0 + 0.1 * (1 - math.exp(1))) / 3, rel=1e-5)
    assert logp.grad[1, 1].item() == 0.0
    # beta 0 (the KL in the reward): the policy part alone
    loss0, _ = grpo_loss(LOGP, old, REF, torch.tensor([1.0, -1.0]), MASK, 0.2, beta=0.0)
    assert loss0.item() == pytest.approx(-0.4, rel=1e-6)
    # An entropy bonus of 0.05 x the token-mean entropy (2 + 4 + 6) / 3 = 4: loss and logged loss both lose 0.2.
    entropy = torch.tensor([[2.0, 4.0], [6.0, 99.0]])  # [1, 1] is padding
    loss_e, stats_e = grpo_loss(LOGP, old, REF, torch.tensor([1.0, -1.0]), MASK, 0.2, 0.1, entropy, 0.05)
    assert loss_e.item() == pytest.approx(-0.4 + 0.1 * k3 - 0.2, rel=1e-6)
    assert stats_e["loss"].item() == loss_e.item(), "the logged loss is the optimised one"


# --- trl 1.16 -----------------------------------------------------------------------------------------------------


def test_grpo_group_std_agrees_with_trl():
    """trl computes GRPO's advantage inline in GRPOTrainer._generate_and_score_completions (no function to call on
    tensors): `(rewards - mean_grouped) / (nanstd(grouped, dim=1) + 1e-4)` with trl's own nanstd. Ours agrees on the
    same scores, the groups with spread (trl leaves float noise in an equal group, we give 0)."""
    from trl.trainer.utils import nanstd

    torch.manual_seed(0)
    scores = torch.randn(6 * 5)
    groups = scores.view(-1, 5)
    trl_advantages = (groups - groups.mean(1, keepdim=True)) / (nanstd(groups, dim=1).unsqueeze(1) + 1e-4)
    assert STD_EPS == 1e-4
    assert torch.allclose(grpo_advantages(scores, 5), trl_advantages.flatten(), atol=1e-6)


def test_rloo_baseline_agrees_with_trl():
    """trl's RLOOTrainer computes the leave-one-out baseline inline: (group sum - s) / (G - 1)."""
    torch.manual_seed(1)
    scores = torch.randn(4 * 3)
    grouped_rewards = scores.view(-1, 3)
    baselines = (grouped_rewards.sum(1, keepdim=True) - grouped_rewards) / (3 - 1)
    assert torch.allclose(rloo_advantages(scores, 3), (grouped_rewards - baselines).flatten(), atol=1e-6)


def test_grpo_loss_agrees_with_trl_compute_loss():
    """trl's own GRPOTrainer._compute_loss (loss_type "bnpo": the token mean over the batch, as ours; beta x k3 per
    token; two-sided clip 0.2) run on our tensors: the same loss, the same gradient, the same KL and clip share. The
    trainer instance is a namespace holding the attributes _compute_loss reads; its per-token log-prob pass returns
    our tensor, so everything after the model's forward is trl's code."""
    from accelerate import Accelerator
    from trl.trainer.grpo_trainer import GRPOTrainer

    torch.manual_seed(2)
    batch, width = 4, 5
    logp = (-3 * torch.rand(batch, width)).requires_grad_()
    old = logp.detach() + 0.3 * torch.randn(batch, width)
    ref = logp.detach() + 0.5 * torch.randn(batch, width)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]]).float()
    advantages = torch.tensor([1.0, -0.5, 2.0, -1.5])
    trainer = types.SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros(batch, width), None),
        top_entropy_quantile=1.0, aux_loss_enabled=False, off_policy_mask_threshold=None,
        importance_sampling_level="token", beta=0.1, loss_type="bnpo", epsilon_low=0.2, epsilon_high=0.2,
        args=types.SimpleNamespace(use_bias_correction_kl=False, delta=None), use_vllm=False,
        _entropy_bonus_enabled=False, model=types.SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, _metrics={"train": defaultdict(list)}, accelerator=Accelerator(cpu=True),
    )  # fmt: skip
    inputs = {
        "prompt_ids": torch.zeros(batch, 2, dtype=torch.long), "prompt_mask": torch.ones(batch, 2, dtype=torch.long),
        "completion_ids": torch.zeros(batch, width, dtype=torch.long), "completion_mask": mask.long(),
        "advantages": advantages, "old_per_token_logps": old, "ref_per_token_logps": ref,
    }  # fmt: skip
    theirs = GRPOTrainer._compute_loss(trainer, None, inputs)
    (trl_grad,) = torch.autograd.grad(theirs, logp)
    ours, stats = grpo_loss(logp, old, ref, advantages, mask, 0.2, beta=0.1)
    (our_grad,) = torch.autograd.grad(ours, logp)
    assert stats["clipfrac"].item() > 0, "some tokens are clipped, or the clip is untested"
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)
    assert torch.allclose(our_grad, trl_grad, atol=1e-7)
    assert stats["kl_loss"].item() == pytest.approx(trainer._metrics["train"]["kl"][0], rel=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(trainer._metrics["train"]["clip_ratio/region_mean"][0], rel=1e-6)


def test_padding_far_from_the_reference_gives_finite_gradients():
    """k3 = expm1(ref - logp) - (ref - logp): a padded position with ref 0 and logp -200 overflows; it must not turn
    the mini-batch's gradient into nan (the update would then skip it)."""
    logp = torch.tensor([[-1.0, -2.0, -200.0]], requires_grad=True)
    ref = torch.tensor([[-1.2, -1.8, 0.0]])
    mask = torch.tensor([[1, 1, 0]])
    loss, stats = grpo_loss(logp, logp.detach(), ref, torch.tensor([1.0]), mask, 0.2, 0.1)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all() and logp.grad[0, 2] == 0
    assert all(torch.isfinite(v) for v in stats.values())
