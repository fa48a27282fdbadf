"""PPO where users run it: the ratio starts at 1 under LLM.int8, no dropout in RL passes, non-finite gradients never
reach Adam, gradient accumulation changes nothing, a resume never silently changes the run, artifacts load with plain
peft from anywhere."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import cli

from rlhf import modeling
from rlhf.config import LoraConfig, load_recipe
from rlhf.io import read_jsonl
from rlhf.ppo import step
from rlhf.ppo.trainer import PPOTrainer
from rlhf.ppo.update import Optimisation, micro_batch_size, optimise
from rlhf.rl.core import masked_mean
from rlhf.rl.parallel import Parallel
from rlhf.rl.policy import Policy, ValueHead, disable_dropout
from rlhf.rl.rollout import Rollout, collect, partition, score
from rlhf.rl.telemetry import Timer
from rlhf.runs import Run

SMALL = ["ppo.batch_size=16", "ppo.mini_batch_size=8", "ppo.rollout_batch_size=16", "ppo.ppo_epochs=1",
         "ppo.eval_prompts=4"]  # fmt: skip


def _trainer(merged_run, tmp_path, *overrides: str, model: dict | None = None) -> PPOTrainer:
    root = tmp_path / "run"
    shutil.copytree(merged_run, root, ignore=shutil.ignore_patterns("checkpoints"))
    run = Run(root)
    recipe, reward = step.prepare(load_recipe("quickstart", [*SMALL, *overrides]), run, None, False, False)
    if model:
        recipe = recipe.model_copy(update={"model": recipe.model.model_copy(update=model)})
    trainer = PPOTrainer(recipe, run, reward, Parallel())
    trainer.setup()
    return trainer


def _scored_rollout(trainer: PPOTrainer, order: torch.Tensor) -> Rollout:
    cfg = trainer.cfg
    prompts = trainer.prompts.batch(0, cfg.batch_size)
    rollout = collect(trainer.policy, trainer.tokenizer, trainer.reward, prompts, cfg.generation, 16, 1, Timer())
    score(rollout, trainer.policy, partition(order, micro_batch_size(cfg)), True, Timer())
    return rollout


def _nudge_adapter(model, std: float = 0.05) -> None:
    """A non-zero LoRA B, so that the policy differs from the reference."""
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, std)


# --- the ratio of the first mini-batch ---------------------------------------------------------------------------


def test_first_minibatch_ratio_is_one_in_8bit(merged_run, tmp_path):
    """A real PPO step on the 8-bit model with a low LLM.int8 threshold (outlier columns exist): the first mini-batch of
    the first epoch sees the policy that sampled, so its logged ratio is 1 and its approx-KL 0."""
    trainer = _trainer(merged_run, tmp_path, model={"llm_int8_threshold": 1.0})
    assert type(trainer.model.base_model.model.gpt_neox.layers[0].attention.query_key_value.base_layer).__name__ == (
        "Linear8bitLt"
    )
    row = trainer.ppo_step()
    assert row is not None
    assert row["first_ratio"] == pytest.approx(1.0, abs=1e-4)
    assert row["first_approx_kl"] < 1e-8 and row["first_clipfrac"] == 0.0
    logged = read_jsonl(trainer.run.ppo_dir / "metrics.jsonl")[-1]
    assert {"first_ratio", "first_approx_kl", "first_clipfrac", "grad_norm"} <= logged.keys()


def test_old_logprobs_scored_in_the_update_partition_match_exactly(merged_run, tmp_path, monkeypatch):
    """LLM.int8 picks outlier columns per batch, so a row's log-prob depends on the rows beside it. bitsandbytes shows
    that on the CPU in eval mode (its CPU train-mode path happens to be batch-independent), so this test holds the
    policy in eval mode: scored in the update's own micro-batches the old log-probs match the update's forward exactly;
    scored in rollout-sized chunks (what PPO did before) they do not, which is the ratio error on CUDA."""
    trainer = _trainer(merged_run, tmp_path, model={"llm_int8_threshold": 1.0})
    _nudge_adapter(trainer.model)
    train = type(trainer.policy).train
    monkeypatch.setattr(trainer.policy, "train", lambda mode=True: train(trainer.policy, False))
    order = torch.randperm(16, generator=torch.Generator().manual_seed(5))
    micro = micro_batch_size(trainer.cfg)
    rollout = _scored_rollout(trainer, order)
    first = order[:micro]
    with torch.no_grad():
        new = trainer.policy(
            rollout.input_ids[first], rollout.attention_mask[first], rollout.response.shape[1]
        ).logprobs
    mask = rollout.response_mask[first]
    same = masked_mean((new - rollout.logprobs[first]).abs(), mask).item()
    score(rollout, trainer.policy, partition(torch.arange(16), 16), True, Timer())
    other = masked_mean((new - rollout.logprobs[first]).abs(), mask).item()
    assert same == 0.0
    assert other > 1e-4, "the batch dependence this guards against must show, or the test proves nothing"


# --- compiled passes --------------------------------------------------------------------------------------------


def test_compiled_passes_give_the_eager_numbers(merged_run, tmp_path):
    """ppo.compile=true compiles the scoring and update passes (not generation): on the 8-bit model they give the
    eager passes' log-probs, values, reference log-probs and gradients."""
    eager = _trainer(merged_run, tmp_path / "eager")
    compiled = _trainer(merged_run, tmp_path / "compiled", "ppo.compile=true")
    assert eager.policy._scoring_model is eager.policy.model
    assert compiled.policy._scoring_model is not compiled.policy.model, "the setting must reach the policy"
    for trainer in (eager, compiled):
        _nudge_adapter(trainer.model)
    compiled.policy.value_head.load_state_dict(eager.policy.value_head.state_dict())
    order = torch.arange(16)
    a, b = _scored_rollout(eager, order), _scored_rollout(compiled, order)
    assert torch.equal(a.response, b.response), "generation is the same eager loop"
    for name in ("logprobs", "values", "ref_logprobs"):
        x, y = getattr(a, name), getattr(b, name)
        assert torch.allclose(x, y, atol=1e-4), (name, (x - y).abs().max())
    grads = []
    for trainer in (eager, compiled):
        policy = trainer.policy.train()
        policy.zero_grad(set_to_none=True)
        out = policy(a.input_ids[:8], a.attention_mask[:8], a.response.shape[1], values=True, entropy=True)
        (out.logprobs.sum() + out.values.sum() + out.entropy.sum()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in policy.trainable_parameters()]))
    assert grads[0].abs().max() > 0
    assert torch.allclose(grads[0], grads[1], rtol=1e-3, atol=1e-4), (grads[0] - grads[1]).abs().max()


# --- dropout ----------------------------------------------------------------------------------------------------


def _tiny(kind: str):
    from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    if kind == "opt":  # residual and attention dropout as `self.dropout` floats
        config = OPTConfig(num_hidden_layers=2, hidden_size=32, ffn_dim=64, num_attention_heads=2, vocab_size=64,
                           word_embed_proj_dim=32, dropout=0.3, attention_dropout=0.3)  # fmt: skip
        return OPTForCausalLM(config), ["q_proj", "v_proj"]
    # attention dropout as a float handed to the attention function
    config = LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=64, attention_dropout=0.3)  # fmt: skip
    return LlamaForCausalLM(config), ["q_proj", "v_proj"]


@pytest.mark.parametrize("kind", ["opt", "llama"])
def test_rl_passes_have_no_dropout(kind):
    """In train mode (where RL scores) a model with dropout gives random log-probs; after disable_dropout, the same.
    LoRA's own dropout is an nn.Dropout module; the bases' are floats read by their forward."""
    base, targets = _tiny(kind)
    base.requires_grad_(False)
    model = modeling.add_lora(base, LoraConfig(rank=4, alpha=8, dropout=0.3, target_modules=targets))
    policy = Policy(model, ValueHead(32)).train()
    ids = torch.randint(0, 64, (3, 10))
    mask = torch.ones_like(ids)

    def twice():
        with torch.no_grad():
            return [policy.score(ids, mask, 5).logprobs for _ in range(2)]

    a, b = twice()
    assert (a - b).abs().max() > 1e-3, "dropout is active, or this test proves nothing"
    assert disable_dropout(model) > 0
    a, b = twice()
    assert torch.equal(a, b)


# --- non-finite gradients ---------------------------------------------------------------------------------------


def test_nonfinite_gradient_skips_the_update(merged_run, tmp_path):
    """A finite loss whose gradient is inf: the mini-batch is skipped and counted, and neither the adapter nor Adam's
    moments see it."""
    trainer = _trainer(merged_run, tmp_path)
    lora = next(p for n, p in trainer.model.named_parameters() if "lora_A" in n)
    handle = lora.register_hook(lambda grad: grad * float("inf"))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainer.ppo_step() is None
    assert trainer.nonfinite_total == 1 and trainer.step == 0
    assert not trainer.optimizer.state, "Adam never stepped"
    for name, p in trainer.model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, before[name]), name
    handle.remove()
    row = trainer.ppo_step()
    assert row is not None and trainer.step == 1 and row["grad_norm"] > 0
    assert all(torch.isfinite(p).all() for p in trainer.params)


# --- gradient accumulation --------------------------------------------------------------------------------------


class Recorder(torch.optim.SGD):
    """SGD with learning rate 0 that keeps a copy of the gradients it was asked to apply."""

    def __init__(self, params):
        super().__init__(params, lr=0.0)
        self.seen: list[list[torch.Tensor]] = []

    def step(self, closure=None):
        self.seen.append([p.grad.detach().clone() for group in self.param_groups for p in group["params"]])
        return super().step(closure)


def test_gradient_accumulation_gives_the_same_gradient(merged_run, tmp_path):
    """One mini-batch of 16 in one micro-batch, or in 2 x 8 with ragged responses: the same gradient (unquantized,
    so float error is all that differs). And the entropy bonus adds exactly its own term's gradient."""
    trainer = _trainer(
        merged_run, tmp_path, "ppo.mini_batch_size=16", "ppo.generation.stop_at_eos=true",
        model={"quantization": "none", "dtype": "float32"},
    )  # fmt: skip
    _nudge_adapter(trainer.model)
    order = torch.randperm(16, generator=torch.Generator().manual_seed(3))
    rollout = _scored_rollout(trainer, order)
    assert len(set(rollout.response_mask.sum(1).tolist())) > 1, "ragged responses, or the token weighting is untested"
    grads = []
    for accumulation in (1, 2):
        cfg = trainer.cfg.model_copy(update={"gradient_accumulation_steps": accumulation, "entropy_coef": 0.0})
        recorder = Recorder(trainer.params)
        opt = Optimisation(trainer.policy, trainer.params, recorder, trainer.parallel)
        optimise(rollout, rollout.scores.float(), opt, cfg, 0.1, order, torch.Generator(), Timer())
        grads.append(recorder.seen[0])
    for one, two in zip(*grads):
        assert torch.allclose(one, two, rtol=1e-5, atol=1e-7), (one - two).abs().max()

    # ppo.entropy_coef adds -coef x (token-mean entropy) to the loss: its gradient is exactly that term's.
    coef = 0.5
    cfg = trainer.cfg.model_copy(update={"entropy_coef": coef})
    recorder = Recorder(trainer.params)
    optimise(rollout, rollout.scores.float(), Optimisation(trainer.policy, trainer.params, recorder, trainer.parallel),
             cfg, 0.1, order, torch.Generator(), Timer())  # fmt: skip
    out = trainer.policy(rollout.input_ids, rollout.attention_mask, rollout.response.shape[1], entropy=True)
    entropy = masked_mean(out.entropy, rollout.response_mask)
    expected = torch.autograd.grad(-coef * entropy, trainer.params, allow_unused=True)
    for with_bonus, without, term in zip(recorder.seen[0], grads[0], expected):
        term = torch.zeros_like(without) if term is None else term
        assert torch.allclose(with_bonus - without, term, rtol=1e-4, atol=1e-7)
    assert any(t is not None and t.abs().max() > 0 for t in expected), "the bonus reaches the adapter"


# --- resume -----------------------------------------------------------------------------------------------------


def test_resume_refuses_changed_settings(merged_run, copy_run, capsys):
    run = copy_run(merged_run)
    args = ("ppo", "--run", run, *SMALL, "ppo.save_steps=1")
    assert cli(*args, "ppo.max_steps=1") == 0
    capsys.readouterr()
    before = sorted(p.name for p in (run / "ppo").rglob("*"))
    assert (
        cli(*args, "ppo.max_steps=2", "--resume", "ppo.learning_rate=0.0005", "ppo.generation.max_new_tokens=12",
            "ppo.compile=true") == 2
    )  # fmt: skip
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "error" in line]  # setup's notes aside
    assert len(err) == 1 and "--resume would change" in err[0]
    assert "ppo.learning_rate: 0.001 -> 0.0005" in err[0] and "ppo.generation.max_new_tokens: 16 -> 12" in err[0]
    assert "ppo.compile: False -> True" in err[0], "compiled and eager log-probs differ: not a free change"
    assert "--force" in err[0]
    assert sorted(p.name for p in (run / "ppo").rglob("*")) == before, "nothing written"
    # Settings that cannot change the rollout may change; --force accepts the others.
    assert cli(*args, "ppo.max_steps=2", "--resume", "ppo.sample_every=7") == 0
    assert cli(*args, "ppo.max_steps=3", "--resume", "--force", "ppo.learning_rate=0.0005") == 0
    assert [r["step"] for r in read_jsonl(run / "ppo/metrics.jsonl")] == [1, 2, 3]
    # The forced rate is the one step 3 trained with, not the checkpoint's (optimizer.load_state_dict restores that).
    optimizer = torch.load(run / "ppo/checkpoints/step-3/optimizer.pt", weights_only=True)
    assert [g["lr"] for g in optimizer["param_groups"]] == [0.0005]
    assert (
        json.loads((run / "ppo/checkpoints/step-3/state.json").read_text())["settings"]["ppo"]["learning_rate"] == 5e-4
    )


# --- artifacts --------------------------------------------------------------------------------------------------


def test_adapters_load_with_plain_peft_from_anywhere(merged_run, copy_run, tmp_path, monkeypatch):
    """sft/adapter and ppo/adapter name bases that plain transformers + peft resolve from any working directory."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = copy_run(merged_run)
    assert cli("ppo", "--run", run, *SMALL, "ppo.max_steps=1") == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    for adapter in (run / "sft/adapter", run / "ppo/adapter"):
        base_name = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_name), str(adapter))
        trained = [n for n, p in model.named_parameters() if "lora_B" in n and p.abs().sum() > 0]
        assert trained, f"{adapter}: the loaded adapter holds its trained weights"
    assert base_name == str((run / "merged").resolve())


# --- guards against over-optimisation ---------------------------------------------------------------------------


def test_kl_ceiling_stops_early_with_the_last_good_checkpoint(merged_run, copy_run, capsys):
    """Step 1 samples from the reference (KL 0); step 2's KL passes a tiny ceiling: the run stops, goes back to step 1's
    checkpoint, and saves and evaluates that policy."""
    from safetensors.torch import load_file

    run = copy_run(merged_run)
    assert cli("ppo", "--run", run, *SMALL, "ppo.max_steps=4", "ppo.save_steps=1", "ppo.kl_ceiling=1e-9") == 0
    assert "stopped early: KL" in capsys.readouterr().err
    assert [p.name for p in (run / "ppo/checkpoints").iterdir()] == ["step-1"]
    ev = json.loads((run / "ppo/eval.json").read_text())
    assert "ppo.kl_ceiling" in ev["early_stop"] and ev["steps"] == 1
    kept = load_file(run / "ppo/checkpoints/step-1/adapter.safetensors")
    final = load_file(run / "ppo/adapter/adapter_model.safetensors")
    assert kept.keys() == final.keys() and all(torch.equal(kept[k], final[k]) for k in kept)


def test_roll_back_before_any_checkpoint_restores_the_start(merged_run, copy_run, tmp_path, capsys):
    """The guard fires at step 2 with no checkpoint saved: the saved adapter is the reference (B = 0), the value head
    the untrained one, and metrics.jsonl holds no row of the steps rolled back."""
    from safetensors.torch import load_file

    run = copy_run(merged_run)
    assert cli("ppo", "--run", run, *SMALL, "ppo.max_steps=4", "ppo.save_steps=10", "ppo.kl_ceiling=1e-9") == 0
    assert "going back to the policy before PPO" in capsys.readouterr().err
    ev = json.loads((run / "ppo/eval.json").read_text())
    assert ev["steps"] == 0 and ev["kl_after"] == pytest.approx(0.0, abs=1e-4)
    assert read_jsonl(run / "ppo/metrics.jsonl") == [] and read_jsonl(run / "ppo/samples.jsonl") == []
    adapter = load_file(run / "ppo/adapter/adapter_model.safetensors")
    assert all(v.abs().sum() == 0 for k, v in adapter.items() if "lora_B" in k)
    untrained = _trainer(merged_run, tmp_path / "fresh").policy.value_head.state_dict()  # same seed, same first head
    saved = load_file(run / "ppo/adapter/value_head.safetensors")
    assert all(torch.equal(saved[k], untrained[k].cpu()) for k in untrained), "the value head is the untrained one"


def test_diversity_floor_guard():
    from types import SimpleNamespace

    from rlhf.config import PpoConfig

    trainer = SimpleNamespace(cfg=PpoConfig(batch_size=16, mini_batch_size=8, diversity_floor=0.8))
    assert PPOTrainer._guard(trainer, {"step": 1, "kl": 0.0, "distinct_2": 0.60}) is None
    assert PPOTrainer._guard(trainer, {"step": 2, "kl": 3.0, "distinct_2": 0.49}) is None  # 0.49 > 0.8 x 0.60
    reason = PPOTrainer._guard(trainer, {"step": 3, "kl": 3.0, "distinct_2": 0.47})
    assert reason and "distinct-2 fell to 0.47" in reason and "0.60 (step 1)" in reason


# --- the terminal -----------------------------------------------------------------------------------------------


def test_library_noise_stays_out_of_the_terminal(merged_run, copy_run):
    """A fresh process (as a user runs it): the libraries' deprecation warnings, info logs and loading bars stay out of
    stderr; rlhf's own lines remain."""
    import os
    import subprocess
    import sys

    run = copy_run(merged_run)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    command = [sys.executable, "-m", "rlhf", "ppo", "--run", str(run), *SMALL, "ppo.max_steps=1"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for noise in ("Warning", "warn(", "Loading weights", "Repo card", "deprecated"):
        assert noise not in done.stderr, (noise, done.stderr[-3000:])
    assert "ppo: before: reward" in done.stderr and "ppo: done" in done.stdout
