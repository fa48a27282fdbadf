"""NF4 (4-bit) through every step on the real bitsandbytes path, at GPT-NeoX's and Llama's shapes: sft, merge, reward,
ppo (on the learned reward, which scores on the policy's own 4-bit base), grpo and dpo; the PPO ratio of the first
mini-batch is 1 and generation's log-probs are the scoring pass's; the merge into the dequantized NF4 weights."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from bitsandbytes.nn import Linear4bit
from conftest import cli

from rlhf import modeling
from rlhf.config import LoraConfig, ModelConfig
from rlhf.io import read_jsonl
from rlhf.rl.policy import Policy, ValueHead
from rlhf.rl.prompts import left_pad

SHAPES = {
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
RL = {"mini_batch_size": 4, "rollout_batch_size": 8, "eval_prompts": 4, "max_steps": 2,
      "generation": {"min_new_tokens": 3, "max_new_tokens": 6}, "gradient_checkpointing": False}  # fmt: skip


def _base(shape: str, fixture_paths, root: Path) -> Path:
    """The fixture's trained GPT-NeoX, or a tiny random Llama (GQA, gated MLP, no biases) with its tokenizer."""
    if shape == "gpt_neox":
        return fixture_paths.policy
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = modeling.load_tokenizer(fixture_paths.policy)
    eos = tokenizer.eos_token_id
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=eos, eos_token_id=eos, tie_word_embeddings=False)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(root / "llama")
    tokenizer.save_pretrained(root / "llama")
    return root / "llama"


@pytest.fixture(scope="module", params=list(SHAPES))
def nf4_run(request, tmp_path_factory, fixture_paths) -> tuple[str, Path]:
    """sft -> merge -> reward -> ppo (learned reward) -> grpo -> dpo, every step on an NF4 base, through the CLI."""
    shape = request.param
    root = tmp_path_factory.mktemp(f"nf4-{shape}")
    lora = {"rank": 8, "alpha": 16, "dropout": 0.0, "target_modules": SHAPES[shape]}
    recipe = {
        "name": f"nf4-{shape}",
        "model": {"name": str(_base(shape, fixture_paths, root)), "quantization": "4bit", "dtype": "float32"},
        "lora": lora,
        "data": {"dataset": "fixture:imdb", "max_documents": 64},
        "sft": {"block_size": 64, "batch_size": 4, "max_steps": 3, "logging_steps": 1, "report_to": []},
        "reward_model": {
            "dataset": "fixture:imdb-preferences",
            "max_length": 96,
            "batch_size": 4,
            "max_steps": 3,
            "eval_pairs": 8,
            "lora": lora,
        },
        "ppo": {"batch_size": 8, "ppo_epochs": 2, "lora": lora, **RL},
        "grpo": {"batch_size": 2, "group_size": 4, "epochs": 2, "lora": lora, **RL},
        "dpo": {
            "dataset": "fixture:imdb-preferences",
            "max_length": 96,
            "batch_size": 4,
            "max_steps": 2,
            "eval_pairs": 8,
            "lora": lora,
            "gradient_checkpointing": False,
            "judge": "quickstart-sentiment",  # generation (eval mode) before training, as the RL steps
            "eval_prompts": 4,
            "rollout_batch_size": 4,
            "generation": {"min_new_tokens": 3, "max_new_tokens": 6},
        },
        "reward": {"name": "quickstart-sentiment"},
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    run = root / "run"
    assert cli("sft", "--recipe", root / "recipe.yaml", "--run", run) == 0
    assert cli("merge", "--run", run) == 0
    assert cli("reward", "--run", run) == 0
    assert cli("ppo", "--run", run, "--reward", run / "reward") == 0
    assert cli("grpo", "--run", run) == 0
    assert cli("dpo", "--run", run) == 0
    return shape, run


def test_every_step_runs_and_learns_on_nf4(nf4_run):
    shape, run = nf4_run
    assert yaml.safe_load((run / "recipe.yaml").read_text())["model"]["quantization"] == "4bit"
    assert json.loads((run / "merged/merge.json").read_text())["max_abs_diff_logits"] <= 5e-2
    assert read_jsonl(run / "sft/metrics.jsonl")
    # The reward step evaluates (eval mode, no grad) before it trains: its adapter still gets gradients.
    assert math.isfinite(json.loads((run / "reward/eval.json").read_text())["accuracy_after"])
    assert all(r["grad_norm"] > 0 for r in read_jsonl(run / "reward/metrics.jsonl"))
    for step in ("ppo", "grpo"):
        rows = read_jsonl(run / f"{step}/metrics.jsonl")
        assert [r["step"] for r in rows] == [1, 2], step
        assert all(math.isfinite(r[k]) for r in rows for k in ("reward_mean", "kl", "policy_loss")), step
        assert (run / f"{step}/adapter/adapter_model.safetensors").is_file()
    dpo = read_jsonl(run / "dpo/metrics.jsonl")
    assert [r["step"] for r in dpo] == [1, 2] and all(r["grad_norm"] > 0 and math.isfinite(r["loss"]) for r in dpo)
    assert (run / "dpo/adapter/adapter_model.safetensors").is_file()
    for row in read_jsonl(run / "ppo/metrics.jsonl"):
        # The first mini-batch of each step's first epoch sees the policy that was scored: ratio 1, approx-KL 0.
        assert row["first_ratio"] == pytest.approx(1.0, abs=1e-5) and row["first_approx_kl"] < 1e-9, row
        assert math.isfinite(row["value_loss"]) and row["grad_norm"] > 0


def _nf4_policy(path: Path, targets: list[str]) -> Policy:
    base = modeling.load_base(ModelConfig(name=str(path), quantization="4bit", dtype="float32"), path)
    layers = [m for m in base.modules() if isinstance(m, Linear4bit)]
    assert layers and all(m.weight.quant_type == "nf4" for m in layers)
    model = modeling.add_lora(base, LoraConfig(rank=8, alpha=16, dropout=0.0, target_modules=targets))
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # a policy that differs from its reference
            p.data.normal_(0, 0.05)
    return Policy(model, ValueHead(base.config.hidden_size))


def test_generation_logprobs_are_the_scoring_passes_then_training_still_has_gradients(nf4_run):
    """Generation runs in eval mode without grad (where bitsandbytes would repack NF4 weights for CPU inference);
    the sampled tokens' log-probs equal a full scoring pass's, and the update that follows in train mode gets a
    gradient on every adapter weight, as a never-evaluated model does."""
    shape, run = nf4_run
    policy = _nf4_policy(run / "merged", SHAPES[shape])
    tok = modeling.load_tokenizer(run / "merged")
    ids, mask = left_pad([tok("This movie", add_special_tokens=False)["input_ids"], [7, 8, 9, 10, 11]],
                         tok.pad_token_id, "cpu")  # fmt: skip
    full_before = torch.cat([ids, torch.randint(0, 100, (2, 6))], 1)
    policy.train()
    policy.score(full_before, torch.ones_like(full_before), 6).logprobs.sum().backward()
    fresh = {n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad and "value_head" not in n}
    policy.zero_grad(set_to_none=True)

    policy.eval()
    torch.manual_seed(1)
    response, rmask, generated = policy.generate(ids, mask, 6)
    full, full_mask = torch.cat([ids, response], 1), torch.cat([mask, rmask], 1)
    policy.train()
    with torch.no_grad():
        scored = policy.score(full, full_mask, 6, values=False).logprobs
        shifted = policy.score(full[:, :-1], full_mask[:, :-1], 6, values=False).logprobs
    assert torch.allclose(generated, scored, atol=1e-4), (generated - scored).abs().max()
    # Control: one position off is 100x the tolerance away (the random Llama is near uniform), so the check can fail.
    assert (shifted - generated).abs().max() > 1e-2

    policy.score(full_before, torch.ones_like(full_before), 6).logprobs.sum().backward()
    for name, grad in fresh.items():
        p = policy.get_parameter(name)
        assert p.grad is not None and torch.allclose(p.grad, grad, atol=1e-5), name


# --- the merge after 4-bit training -----------------------------------------------------------------------------


def test_dequantized_merge_writes_the_model_that_was_trained(nf4_run, copy_run):
    """merge.base_weights=dequantized: each quantized weight is bitsandbytes' own NF4 dequantization plus the adapter's
    delta, and the merged logits are the 4-bit base + adapter's (what was trained), where the default merge into the
    original weights is far from them."""
    import bitsandbytes.functional as F
    from peft import PeftModel
    from safetensors.torch import load_file

    shape, shared = nf4_run
    original = json.loads((shared / "merged/merge.json").read_text())
    run = copy_run(shared)
    assert cli("merge", "--run", run, "--force", "--base-weights", "dequantized") == 0
    record = json.loads((run / "merged/merge.json").read_text())
    assert record["base_weights"] == "dequantized"
    assert record["max_abs_diff_logits"] == record["max_abs_diff_logits_vs_trained"] <= 2e-2
    assert original["max_abs_diff_logits_vs_trained"] > 10 * record["max_abs_diff_logits_vs_trained"]
    assert "rounded through NF4" in (run / "merged/README.md").read_text()

    yaml_model = yaml.safe_load((run / "recipe.yaml").read_text())["model"]
    base = modeling.load_base(ModelConfig(**yaml_model), yaml_model["name"])
    assert record["nf4_rounded_tensors"] == sum(isinstance(m, Linear4bit) for m in base.modules())
    trained = PeftModel.from_pretrained(base, run / "sft/adapter")
    merged = load_file(run / "merged/model.safetensors")
    layer = next(m for n, m in trained.named_modules() if n.endswith(SHAPES[shape][0]) and hasattr(m, "base_layer"))
    name = next(n for n, m in trained.base_model.model.named_modules() if m is layer) + ".weight"
    weight = layer.base_layer.weight
    expected = F.dequantize_4bit(weight.data, weight.quant_state).float() + layer.get_delta_weight("default").float()
    assert torch.allclose(merged[name].float(), expected, rtol=1e-3, atol=1e-4), (merged[name] - expected).abs().max()


def test_dequantized_merge_after_an_8bit_sft_is_one_line(sft_run, copy_run, capsys):
    run = copy_run(sft_run)
    assert cli("merge", "--run", run, "--base-weights", "dequantized") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.quantization=8bit" in err[0] and "merge.base_weights=original" in err[0]
    assert not (run / "merged").exists()
