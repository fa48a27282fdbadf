"""`rlhf dpo`: the DPO maths by hand and against trl's DPOTrainer on the same model and pairs, a short run's outputs
and rising preference accuracy, the adapter loaded with plain peft, exact resume after kill -9, and one-line refusals
of bad pairs that write nothing."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import cli
from safetensors.torch import load_file

from rlhf.dpo.data import PreferencePairs
from rlhf.dpo.loss import dpo_losses, kl_proxy, reward_stats
from rlhf.errors import UserError
from rlhf.io import read_jsonl

# A short run that learns, judged on a few held-out prompts: PPO's eval keys in eval.json.
SHORT = ["dpo.max_steps=30", "dpo.batch_size=8", "dpo.eval_pairs=64", "dpo.eval_prompts=8", "dpo.rollout_batch_size=8"]
# 12 steps: after its first checkpoint the run still needs ~1 s, so the kill lands mid-run (at 4 steps the run ended
# before the kill about one time in seven on an idle machine).
TINY = ["dpo.batch_size=4", "dpo.eval_pairs=8", "dpo.lr_scheduler=constant", "dpo.judge=null", "dpo.max_steps=12",
        "dpo.save_steps=1"]  # fmt: skip


def _dpo(run, *extra) -> int:
    return cli("dpo", "--recipe", "quickstart", "--run", run, *extra)


def _tree(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, merged_run):
    run = tmp_path_factory.mktemp("dpo") / "run"
    shutil.copytree(merged_run, run)
    assert _dpo(run, *SHORT) == 0
    return run


# --- the maths, by hand and against trl -------------------------------------------------------------------------


def test_dpo_loss_and_implicit_rewards_by_hand():
    # policy and reference log-probs of two pairs' answers
    chosen, rejected = torch.tensor([-10.0, -4.0]), torch.tensor([-12.0, -3.0])
    ref_chosen, ref_rejected = torch.tensor([-11.0, -4.0]), torch.tensor([-11.0, -4.0])
    # log-ratios: chosen (1, 0), rejected (-1, 1); margins (2, -1); beta 0.5 -> beta x margin (1, -0.5)
    losses, rc, rr = dpo_losses(chosen, rejected, ref_chosen, ref_rejected, beta=0.5)
    # -log sigmoid(1) = 0.313262; -log sigmoid(-0.5) = 0.974077
    assert losses.tolist() == pytest.approx([0.313262, 0.974077], abs=1e-6)
    assert rc.tolist() == [0.5, 0.0] and rr.tolist() == [-0.5, 0.5]
    # conservative DPO, label smoothing 0.1: 0.9 x -log sigmoid(x) + 0.1 x -log sigmoid(-x); -log sigmoid(-1) = 1.313262
    losses, _, _ = dpo_losses(chosen, rejected, ref_chosen, ref_rejected, beta=0.5, label_smoothing=0.1)
    assert losses[0].item() == pytest.approx(0.9 * 0.313262 + 0.1 * 1.313262, abs=1e-6)
    # robust: (0.9 x -log sigmoid(1) - 0.1 x -log sigmoid(-1)) / 0.8
    losses, _, _ = dpo_losses(chosen, rejected, ref_chosen, ref_rejected, 0.5, "robust", 0.1)
    assert losses[0].item() == pytest.approx((0.9 * 0.313262 - 0.1 * 1.313262) / 0.8, abs=1e-6)
    # ipo: per-token log-ratios (1/2 - (-1)/4, 0/1 - 1/4) = (0.75, -0.25); (x - 1/(2 x 0.5))^2
    tokens_c, tokens_r = torch.tensor([2.0, 1.0]), torch.tensor([4.0, 4.0])
    losses, _, _ = dpo_losses(chosen, rejected, ref_chosen, ref_rejected, 0.5, "ipo", 0.0, tokens_c, tokens_r)
    assert losses.tolist() == pytest.approx([0.0625, 1.5625], abs=1e-6)
    # policy == reference: every reward 0, the loss log 2, and a tie orders nothing (accuracy 0)
    losses, rc, rr = dpo_losses(chosen, rejected, chosen, rejected, beta=0.1)
    assert losses.tolist() == pytest.approx([math.log(2)] * 2) and reward_stats(rc, rr)["accuracy"] == 0.0
    stats = reward_stats(torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 1.0, -1.0]))
    assert stats["accuracy"] == pytest.approx(2 / 3) and stats["margin_mean"] == pytest.approx(1.0)
    # the gradient raises the chosen answer's log-prob and lowers the rejected one's, by beta x sigmoid(-beta x m)
    c, r = torch.tensor([0.0], requires_grad=True), torch.tensor([0.0], requires_grad=True)
    dpo_losses(c, r, torch.zeros(1), torch.zeros(1), beta=0.5)[0].sum().backward()
    assert c.grad.item() == pytest.approx(-0.25) and r.grad.item() == pytest.approx(0.25)
    # the KL proxy: sum over answer tokens of (log pi - log ref)^2 / 2, padding left out
    lp, ref, mask = torch.tensor([[-1.0, -2.0, -9.0]]), torch.tensor([[-2.0, -2.0, -1.0]]), torch.tensor([[1, 1, 0]])
    assert kl_proxy(lp, ref, mask).tolist() == [0.5]


def test_pairs_are_prompt_then_answers(fixture_paths, tmp_path):
    from transformers import AutoTokenizer

    from rlhf.config import DpoConfig
    from rlhf.dpo.data import load_pairs

    tok = AutoTokenizer.from_pretrained(fixture_paths.policy)
    data = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "So I saw it", "chosen": " twice. What a delight", "rejected": " once. Dull"}] * 4
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train, held_out, prefs = load_pairs(DpoConfig(dataset=str(data), eval_pairs=1), tok)
    prompt = tok("So I saw it", add_special_tokens=False)["input_ids"]
    assert (len(train), len(held_out)) == (3, 1) and "explicit" in prefs.form
    assert train.prompt_lengths[0] == len(prompt) and train.chosen[0][: len(prompt)] == prompt
    assert train.chosen[0][-1] == train.rejected[0][-1] == tok.eos_token_id  # TRL's EOS after each answer
    no_eos, _, _ = load_pairs(DpoConfig(dataset=str(data), eval_pairs=1, add_eos=False), tok)
    assert no_eos.chosen[0] == train.chosen[0][:-1]
    cut, _, _ = load_pairs(DpoConfig(dataset=str(data), eval_pairs=1, max_prompt_length=2), tok)
    assert cut.prompt_lengths[0] == 2 and cut.chosen[0] == train.chosen[0][len(prompt) - 2 :]  # the prompt's end
    with pytest.raises(UserError, match=r"no training pair fits dpo.max_length=\d+ tokens a side \(3 left out\)"):
        load_pairs(DpoConfig(dataset=str(data), eval_pairs=1, max_length=len(train.chosen[0]) - 1), tok)


@pytest.fixture
def fresh_accelerate_state():
    """trl's Trainer sets accelerate's process-wide state from its own config, as rlhf's RL steps do from theirs
    (rlhf.rl.parallel); each refuses a state the other made, so the state is reset around trl's use of it."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize(
    "loss_type, smoothing, sft_weight", [("sigmoid", 0.0, 0.0), ("robust", 0.2, 0.0), ("ipo", 0.0, 0.0),
                                         ("sigmoid", 0.0, 0.5)]
)  # fmt: skip
def test_loss_rewards_and_gradients_equal_trls(
    merged_run, tmp_path, fresh_accelerate_state, loss_type, smoothing, sft_weight
):
    """trl 1.16's DPOTrainer (its own LoRA from peft_config, its reference the disabled adapter) and our pair_terms
    on the same model, the same collated pairs: the same loss, implicit rewards and LoRA gradients."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from rlhf import modeling
    from rlhf.config import LoraConfig, ModelConfig, load_recipe
    from rlhf.dpo.trainer import DpoTrainer
    from rlhf.rl.policy import Policy
    from rlhf.runs import Run

    merged = merged_run / "merged"
    tok = modeling.load_tokenizer(merged)
    rows = [{"prompt": "The film", "chosen": " was a delight.", "rejected": " was dull and far too long."},
            {"prompt": "I saw it", "chosen": " twice, wonderful", "rejected": " once. Awful"},
            {"prompt": "Honestly", "chosen": " great", "rejected": " a waste of time"}]  # fmt: skip
    base = modeling.load_base(ModelConfig(name=str(merged), quantization="none", dtype="float32"), merged)
    peft_config = modeling.lora_config(LoraConfig(rank=4, alpha=8, dropout=0.0), ["query_key_value", "dense"])
    # dpo.sft_weight w is trl's loss_type [loss_type, sft] with loss_weights [1, w] (RPO)
    losses = (
        {"loss_type": [loss_type, "sft"], "loss_weights": [1.0, sft_weight]} if sft_weight else {"loss_type": loss_type}
    )
    args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=0.3, label_smoothing=smoothing, report_to=[],
                     use_cpu=True, **losses)  # fmt: skip
    trl = DPOTrainer(base, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                     peft_config=peft_config)  # fmt: skip
    model = trl.model
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.2)  # a policy away from its reference

    def enc(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    examples = [{"prompt_ids": enc(r["prompt"]), "chosen_ids": enc(r["chosen"]) + [tok.eos_token_id],
                 "rejected_ids": enc(r["rejected"]) + [tok.eos_token_id]} for r in rows]  # fmt: skip
    model.train()
    loss = trl.compute_loss(model, DataCollatorForPreference(pad_token_id=tok.pad_token_id)(examples))
    loss.backward()
    trl_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    metrics = trl._metrics["train"]
    model.zero_grad()

    settings = [f"dpo.loss_type={loss_type}", f"dpo.label_smoothing={smoothing}", f"dpo.sft_weight={sft_weight}"]
    recipe = load_recipe("quickstart", ["dpo.beta=0.3", *settings])
    ours = DpoTrainer(recipe, Run(tmp_path / "run"))
    ours.tokenizer, ours.model, ours.policy = tok, model, Policy(model)
    pairs = PreferencePairs([e["prompt_ids"] + e["chosen_ids"] for e in examples],
                            [e["prompt_ids"] + e["rejected_ids"] for e in examples],
                            [len(e["prompt_ids"]) for e in examples], "rows")  # fmt: skip
    terms = ours.pair_terms(pairs, [0, 1, 2])
    terms["losses"].mean().backward()

    assert terms["losses"].mean().item() == pytest.approx(loss.item(), rel=1e-5, abs=1e-6)
    assert terms["chosen_rewards"].mean().item() == pytest.approx(metrics["rewards/chosen"][-1], abs=1e-5)
    assert terms["rejected_rewards"].mean().item() == pytest.approx(metrics["rewards/rejected"][-1], abs=1e-5)
    assert abs(metrics["rewards/chosen"][-1]) > 1e-3, "a policy that differs from its reference"
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p.grad, trl_grads[name], atol=1e-5), name
    assert any(g.abs().max() > 1e-2 for g in trl_grads.values())


# --- a short run ------------------------------------------------------------------------------------------------


def test_short_run_writes_its_outputs_and_preference_accuracy_rises(dpo_run):
    adapter = dpo_run / "dpo/adapter"
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= {p.name for p in adapter.iterdir()}
    rows = read_jsonl(dpo_run / "dpo/metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 31))
    for key in ("loss", "accuracy", "margin_mean", "chosen_reward", "rejected_reward", "kl_proxy", "tokens_per_s",
                "peak_mem_bytes", "grad_norm", "lr"):  # fmt: skip
        assert math.isfinite(rows[-1][key]), key
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # step 1 starts at the reference
    assert rows[-1]["kl_proxy"] > 0 and rows[-1]["peak_mem_bytes"] > 0
    ev = json.loads((dpo_run / "dpo/eval.json").read_text())
    assert ev["n_pairs"] == 64 and ev["steps"] == 30 and ev["eval_split"] == "test"
    assert ev["accuracy_before"] == 0.0 and ev["margin_mean_before"] == 0.0  # policy == reference: all ties
    assert ev["accuracy_after"] >= 0.6 and ev["margin_mean_after"] > 0.1, ev
    assert ev["loss_before"] == pytest.approx(math.log(2), abs=1e-4) and ev["loss_after"] < ev["loss_before"]
    assert 0.0 <= ev["likelihood_accuracy_before"] <= 1.0  # the reference's own ranking of the pairs
    # the judged generations, with PPO's eval keys
    for key in ("positive_rate", "reward", "distinct_2", "perplexity"):
        assert math.isfinite(ev[f"{key}_before"]) and math.isfinite(ev[f"{key}_after"]), key
    assert ev["kl_before"] == pytest.approx(0.0, abs=1e-5) and ev["kl_after"] > 0
    assert ev["n_prompts"] == 8 and ev["judge"] == "quickstart-sentiment"
    assert "dpo:" in (dpo_run / "recipe.yaml").read_text()
    assert (dpo_run / "dpo/checkpoints/step-30").is_dir()
    assert cli("report", "--run", dpo_run) == 0
    report = (dpo_run / "report.md").read_text()
    assert "DPO" in report and f"{ev['accuracy_after']:.2f}" in report


def test_adapter_loads_with_plain_peft_from_anywhere(dpo_run, tmp_path, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.chdir(tmp_path)  # the adapter names its base by absolute path
    adapter = dpo_run / "dpo/adapter"
    base_path = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(base_path).is_absolute()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), adapter).eval()
    tok = AutoTokenizer.from_pretrained(base_path)
    ids = torch.tensor([tok("The film was")["input_ids"]])
    with torch.no_grad():
        tuned = model(input_ids=ids).logits
        with model.disable_adapter():
            reference = model(input_ids=ids).logits
    assert (tuned - reference).abs().max() > 1e-3, "the trained adapter changes the model"
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in model.named_parameters())


# --- resume after kill -9 ---------------------------------------------------------------------------------------


def _newest_checkpoint(run: Path) -> int:
    return max((int(p.name.split("-")[1]) for p in (run / "dpo/checkpoints").glob("step-*")), default=0)


def test_killed_and_resumed_equals_uninterrupted(merged_run, copy_run, tmp_path):
    straight = copy_run(merged_run, "straight")
    assert _dpo(straight, *TINY) == 0

    run = copy_run(merged_run, "killed")
    log = tmp_path / "stderr.txt"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    with open(log, "w") as err:
        command = [sys.executable, "-m", "rlhf", "dpo", "--recipe", "quickstart", "--run", str(run), *TINY]
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err, env=env)
    deadline = time.monotonic() + 180
    while _newest_checkpoint(run) < 1 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "finished before the kill: " + log.read_text()[-2000:]
    time.sleep(random.Random(3).uniform(0.0, 0.3))  # somewhere in a later step or its checkpoint
    proc.send_signal(signal.SIGKILL)
    proc.wait(60)
    assert _newest_checkpoint(run) < 12, "killed after the run ended: nothing was resumed"

    assert _dpo(run, *TINY, "--resume") == 0
    a, b = read_jsonl(straight / "dpo/metrics.jsonl"), read_jsonl(run / "dpo/metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 13)), "every step logged exactly once"
    for key in ("loss", "chosen_reward", "rejected_reward", "kl_proxy", "grad_norm"):
        assert [r[key] for r in a] == pytest.approx([r[key] for r in b], rel=1e-5, abs=1e-7), key
    fa, fb = (load_file(r / "dpo/adapter/adapter_model.safetensors") for r in (straight, run))
    assert fa.keys() == fb.keys() and all(torch.allclose(fa[k], fb[k], atol=1e-7) for k in fa)
    assert json.loads((run / "dpo/eval.json").read_text())["accuracy_after"] == pytest.approx(
        json.loads((straight / "dpo/eval.json").read_text())["accuracy_after"]
    )
    assert not list((run / "dpo/checkpoints").glob(".*")), "no half-written checkpoint left behind"
    assert _dpo(run, *TINY) == 2  # done: --resume or --force, never silently again


# --- bad input: one line, exit 2 (3: does not fit), nothing written ---------------------------------------------


@pytest.mark.parametrize(
    "rows, expected",
    [
        ([{"prompt": "It was", "preferred": " great", "rejected": " bad"}], "no column 'chosen'"),
        ([{"chosen": "It was great", "rejected": "It was bad"}, {"chosen": "It was fine", "rejected": ""}], "empty"),
        (
            [{"prompt": "It was", "chosen": " great", "rejected": " bad"}, {"prompt": "It was", "chosen": " fine",
              "rejected": " fine"}],
            "row 1: chosen and rejected are the same answer (3 of 6 rows), so there is nothing to prefer; remove those "
            "rows, or set dpo.skip_identical_pairs=true",
        ),
    ],
    ids=["missing-chosen-column", "empty-side", "identical-sides"],
)  # fmt: skip
def test_bad_pairs_are_one_line_and_write_nothing(merged_run, copy_run, tmp_path, capsys, rows, expected):
    run = copy_run(merged_run)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows * 3))
    before = _tree(run)
    assert cli("dpo", "--run", run, "--dataset", data) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1, err
    assert "reward_model." not in err  # the settings named are dpo's
    assert _tree(run) == before


def test_does_not_fit_is_refused_before_anything_loads(merged_run, copy_run, capsys):
    run = copy_run(merged_run)
    before = _tree(run)
    assert cli("dpo", "--recipe", "quickstart", "--run", run, "--gpu", "620MiB") == 3
    err = capsys.readouterr().err.strip()
    assert err.startswith("rlhf: does not fit: dpo needs") and "cheapest fix: dpo." in err, err
    assert _tree(run) == before
