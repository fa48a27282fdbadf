"""Step 3: the adapter-disabled reference, padding-consistent log-probs, rewards by label name, resume equality."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import cli
from safetensors.torch import load_file

from rlhf import modeling
from rlhf.config import LoraConfig, ModelConfig
from rlhf.errors import UserError
from rlhf.io import read_jsonl
from rlhf.rl.policy import Policy, ValueHead
from rlhf.rl.prompts import left_pad

DETERMINISTIC = ("reward_mean", "reward_std", "kl", "kl_coef", "policy_loss", "value_loss", "entropy", "clipfrac",
                 "approx_kl", "response_len")  # fmt: skip


def _policy(merged_run, quantization: str):
    merged = merged_run / "merged"
    cfg = ModelConfig(name=str(merged), quantization=quantization, dtype="float32")
    base = modeling.load_base(cfg, merged)
    modeling.prepare_for_training(base, gradient_checkpointing=True)
    model = modeling.add_lora(base, LoraConfig(rank=8, alpha=16, dropout=0.0))
    # A non-zero adapter, so that policy and reference really differ.
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)
    return Policy(model, ValueHead(base.config.hidden_size)).eval(), modeling.load_tokenizer(merged)


@pytest.fixture(scope="module")
def policy(merged_run):
    return _policy(merged_run, "8bit")


@pytest.fixture(scope="module")
def policy_fp32(merged_run):
    return _policy(merged_run, "none")


def test_reference_is_the_merged_model_without_adapter(policy, merged_run):
    pol, tok = policy
    ids, mask = left_pad([tok("the film was", add_special_tokens=False)["input_ids"] + [5, 6, 7]], 0, "cpu")
    with torch.no_grad():
        with pol.reference():
            ref = pol.score(ids, mask, 3, values=False).logprobs
        own = pol.score(ids, mask, 3, values=False).logprobs
        plain = modeling.load_base(ModelConfig(name="m", quantization="8bit", dtype="float32"), merged_run / "merged")
        logits = plain(input_ids=ids).logits[:, -4:-1].float()
        expected = torch.log_softmax(logits, -1).gather(-1, ids[:, -3:, None]).squeeze(-1)
    assert torch.allclose(ref, expected, atol=1e-5)
    assert (own - ref).abs().max() > 1e-3, "the adapter must change the policy, or this test proves nothing"


# In eval mode LLM.int8 (CPU) picks its fp16 outlier columns per batch; measured 0.005-0.12 between merged models that
# the session's SFT trained with 1 or 2 threads. Attending to padding is off by > 1 (the control below).
INT8_BATCH_ATOL = 0.15


@pytest.mark.parametrize("which, atol", [("policy_fp32", 1e-4), ("policy", INT8_BATCH_ATOL)])
def test_left_padding_changes_nothing(which, atol, request):
    """Policy log-probs and values of a left-padded row equal those of the same row unpadded (the negative-KL
    pitfall: padded and unpadded inputs scored differently). Exact in fp32; in 8-bit, LLM.int8 picks its
    fp16 outlier columns per batch, so batch composition moves the numbers (INT8_BATCH_ATOL)."""
    pol, tok = request.getfixturevalue(which)
    short = tok("a dull plot", add_special_tokens=False)["input_ids"] + [11, 12, 13, 14]
    long = tok("I watched this film last weekend and", add_special_tokens=False)["input_ids"] + [11, 12, 13, 14]
    ids, mask = left_pad([short, long], tok.pad_token_id, "cpu")
    alone, alone_mask = left_pad([short], tok.pad_token_id, "cpu")
    with torch.no_grad():
        batched = pol.score(ids, mask, 4, values=True)
        single = pol.score(alone, alone_mask, 4, values=True)
        # Control: the padded row scored with its padding attended to is far off, so this test can fail.
        wrong_lp = pol.score(ids, torch.ones_like(mask), 4, values=False).logprobs[0]
    assert ids.shape[1] > alone.shape[1]
    assert torch.allclose(batched.logprobs[0], single.logprobs[0], atol=atol)
    assert torch.allclose(batched.values[0], single.values[0], atol=atol)
    assert (wrong_lp - single.logprobs[0]).abs().max() > 3 * atol


def test_padding_columns_are_cut_and_change_nothing(policy_fp32):
    """Columns that are padding in every row (shared left padding, response tails masked in all rows) never reach the
    model, and the log-probs, values and entropy of the rest are those of the batch without them; the cut tail comes
    back as zeros, so callers see the width they asked for."""
    pol, tok = policy_fp32
    pad = tok.pad_token_id
    prompts = [
        tok("a dull plot", add_special_tokens=False)["input_ids"],
        tok("I liked it", add_special_tokens=False)["input_ids"],
    ]
    ids, mask = left_pad(prompts, pad, "cpu")
    response = torch.tensor([[11, 12, 13, 14], [21, 22, 23, 24]])
    rmask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])  # row 1 ends early: its own tail stays, masked
    tight = (torch.cat([ids, response], 1), torch.cat([mask, rmask], 1))
    # The same batch with 3 more all-pad prompt columns and a 3-token response tail masked in every row.
    wide_ids = torch.cat([torch.full((2, 3), pad), ids, response, torch.full((2, 3), pad)], 1)
    wide_mask = torch.cat([torch.zeros(2, 3, dtype=torch.long), mask, rmask, torch.zeros(2, 3, dtype=torch.long)], 1)
    seen = []
    hook = pol.model.get_base_model().register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["input_ids"].shape), with_kwargs=True
    )
    try:
        with torch.no_grad():
            expect = pol.score(*tight, 4, values=True, entropy=True)
            got = pol.score(wide_ids, wide_mask, 7, values=True, entropy=True)
    finally:
        hook.remove()
    assert seen == [tight[0].shape, tight[0].shape], seen  # the wide batch reached the model cut to the tight one
    for name in ("logprobs", "values", "entropy"):
        a, b = getattr(expect, name), getattr(got, name)
        assert b.shape == (2, 7)
        assert torch.allclose(b[:, :4], a, atol=1e-5), (name, (b[:, :4] - a).abs().max())
        assert (b[:, 4:] == 0).all()


@pytest.mark.parametrize("which, atol", [("policy_fp32", 1e-4), ("policy", INT8_BATCH_ATOL)])
def test_generation_logprobs_match_scoring(which, atol, request):
    """Tokens sampled by the KV-cache loop are scored by the full forward at the same positions and get the same
    log-probs: exact up to float error unquantized; in 8-bit LLM.int8's per-batch outlier columns differ between a
    one-token decode step and the whole sequence, so only within the padding test's bound."""
    pol, tok = request.getfixturevalue(which)
    ids, mask = left_pad(
        [tok("This movie", add_special_tokens=False)["input_ids"], [7, 8, 9, 10, 11]], tok.pad_token_id, "cpu"
    )
    torch.manual_seed(1)
    response, rmask, generated = pol.generate(ids, mask, 6)
    assert response.shape == generated.shape == (2, 6) and rmask.all()
    full = torch.cat([ids, response], 1)
    full_mask = torch.cat([mask, rmask], 1)
    with torch.no_grad():
        scored = pol.score(full, full_mask, 6, values=False).logprobs
        # Control: scored one position off, the log-probs are far apart, so the comparison can fail.
        shifted = pol.score(full[:, :-1], full_mask[:, :-1], 6, values=False).logprobs
    assert torch.allclose(generated, scored, atol=atol), (generated - scored).abs().max()
    assert (shifted - generated).abs().max() > 1.0  # nats: far beyond either tolerance


def test_stop_at_eos_masks_what_follows(policy_fp32):
    """With an EOS id, a row keeps its first EOS and every token after it is masked out; other rows run on."""
    pol, tok = policy_fp32
    ids, mask = left_pad([[7, 8, 9], [10, 11, 12]], tok.pad_token_id, "cpu")
    torch.manual_seed(3)
    response, _, _ = pol.generate(ids, mask, 8)
    eos = int(response[0, 2])  # a token row 0 really samples at its 3rd position, under the same seed
    torch.manual_seed(3)
    again, rmask, _ = pol.generate(ids, mask, 8, eos_token_id=eos)
    n = again.shape[1]
    assert torch.equal(again, response[:, :n]), "the mask changes nothing about sampling"
    for row in range(2):
        hits = (again[row] == eos).nonzero().flatten().tolist()
        first = hits[0] if hits else n
        assert rmask[row, : first + 1].all() and not rmask[row, first + 1 :].any(), (row, hits, rmask[row])
    assert not rmask[0, 3:].any()
    # Once every row has ended, decoding stops: a row alone ends at its first EOS, and so does the response.
    torch.manual_seed(5)
    free, _, _ = pol.generate(ids[:1], mask[:1], 8)
    end = int((free[0] == free[0, 2]).nonzero()[0]) + 1  # the first place its 3rd token occurs
    torch.manual_seed(5)
    alone, alone_mask, alone_lp = pol.generate(ids[:1], mask[:1], 8, eos_token_id=int(free[0, 2]))
    assert alone.shape == alone_mask.shape == alone_lp.shape == (1, end) and alone_mask.all()
    assert torch.equal(alone, free[:, :end])


def test_reward_label_is_chosen_by_name(fixture_paths, tmp_path):
    from rlhf.rewards import load_reward

    reward = load_reward("quickstart-sentiment")
    assert reward.model.config.id2label[reward.label_index] == "POSITIVE"
    scores = reward(
        [
            "A masterpiece. The acting is superb and the story is moving.",
            "A disaster. The plot is dull and the acting is wooden.",
        ]
    )
    assert scores.scores[0] > scores.scores[1] and scores.positive.tolist() == [True, False]

    spec = tmp_path / "happy.yaml"
    spec.write_text(f"name: happy\nmodel: {fixture_paths.reward}\nlabel: HAPPY\n")
    with pytest.raises(UserError) as e:
        load_reward(str(spec))
    assert "HAPPY" in str(e.value) and "NEGATIVE" in str(e.value) and "POSITIVE" in str(e.value)


def test_unknown_reward_lists_available(merged_run, copy_run, capsys):
    run = copy_run(merged_run)
    assert cli("ppo", "--recipe", "quickstart", "--reward", "no-such-reward", "--run", run) == 2
    err = capsys.readouterr().err
    assert "quickstart-sentiment" in err and "imdb-sentiment" in err and len(err.strip().splitlines()) == 1


def test_ppo_before_merge_names_the_step(sft_run, copy_run, capsys):
    run = copy_run(sft_run)
    assert cli("ppo", "--recipe", "quickstart", "--reward", "quickstart-sentiment", "--run", run) == 2
    assert "rlhf merge" in capsys.readouterr().err


SMALL = ["ppo.batch_size=16", "ppo.mini_batch_size=8", "ppo.rollout_batch_size=16", "ppo.ppo_epochs=2",
         "ppo.eval_prompts=8", "ppo.save_steps=1", "ppo.sample_every=1"]  # fmt: skip


def _ppo(run, *extra):
    return cli("ppo", "--recipe", "quickstart", "--reward", "quickstart-sentiment", "--run", run, *SMALL, *extra)


def test_resume_continues_exactly(merged_run, copy_run):
    straight = copy_run(merged_run, "straight")
    assert _ppo(straight, "ppo.max_steps=4") == 0
    split = copy_run(merged_run, "split")
    assert _ppo(split, "ppo.max_steps=2") == 0
    assert _ppo(split, "ppo.max_steps=4", "--resume") == 0

    a, b = read_jsonl(straight / "ppo/metrics.jsonl"), read_jsonl(split / "ppo/metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for key in DETERMINISTIC:
            assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-6), (ra["step"], key)
    fa, fb = (
        load_file(straight / "ppo/adapter/adapter_model.safetensors"),
        load_file(split / "ppo/adapter/adapter_model.safetensors"),
    )
    assert fa.keys() == fb.keys() and all(torch.allclose(fa[k], fb[k], atol=1e-6) for k in fa)
    assert torch.allclose(
        load_file(straight / "ppo/adapter/value_head.safetensors")["summary.weight"],
        load_file(split / "ppo/adapter/value_head.safetensors")["summary.weight"],
        atol=1e-6,
    )


def test_ppo_outputs_and_base_untouched(merged_run, copy_run, capsys):
    run = copy_run(merged_run)
    merged_before = (run / "merged/model.safetensors").read_bytes()
    assert _ppo(run, "ppo.max_steps=2") == 0
    assert (run / "merged/model.safetensors").read_bytes() == merged_before
    last = read_jsonl(run / "ppo/metrics.jsonl")[-1]
    # Throughput, as the progress bar shows it: response tokens per second of the whole step, the generation share.
    assert last["tokens_per_s"] == pytest.approx(last["response_len"] * 16 / last["time_step"], rel=1e-6)
    assert last["generate_share"] == pytest.approx(last["time_generate"] / last["time_step"])
    assert 0 < last["generate_share"] < 1
    bar = capsys.readouterr().err
    assert f"tok_s={last['tokens_per_s']:.0f}" in bar and f"gen={100 * last['generate_share']:.0f}%" in bar
    for key in (
        "step",
        "reward_mean",
        "reward_std",
        "kl",
        "kl_coef",
        "policy_loss",
        "value_loss",
        "entropy",
        "clipfrac",
        "approx_kl",
        "response_len",
        "tokens_per_s",
        "peak_mem_bytes",
    ):
        assert key in last
    adapter = load_file(run / "ppo/adapter/adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items()), "the policy adapter was trained"
    assert (run / "ppo/adapter/adapter_config.json").is_file()
    assert set(load_file(run / "ppo/adapter/value_head.safetensors")) == {"summary.weight", "summary.bias"}
    ev = json.loads((run / "ppo/eval.json").read_text())
    for key in (
        "reward_before",
        "reward_after",
        "positive_rate_before",
        "positive_rate_after",
        "kl_after",
        "n_prompts",
        "perplexity_before",
        "perplexity_after",
        "distinct_1_before",
        "distinct_2_after",
        "repetition_after",
        "response_perplexity_before",
        "response_perplexity_after",
    ):
        assert key in ev
    assert 0 < ev["distinct_2_before"] <= 1 and ev["response_perplexity_before"] > 1
    assert ev["eval_split"] == "test" and ev["held_out_of_train"] == 0, "an eval split: nothing taken from train"
    assert ev["kl_before"] == pytest.approx(0.0, abs=1e-4), "before training the policy is the reference"
    assert read_jsonl(run / "ppo/samples.jsonl")
    # A second run without --resume/--force is refused and changes nothing.
    assert _ppo(run, "ppo.max_steps=2") == 2
    shutil.rmtree(run)
