"""Half precision end to end under CUDA's dtype rules: sft -> merge -> reward, ppo, grpo, dpo in fp16 and bf16.

The recipes users run are fp16 (gpt-neox-20b) and bf16 (llama-3.1-8b, qwen2.5-14b). Every command here runs inside
`rlhf.testing.cuda_rules`, which raises where a CUDA kernel would refuse a call the CPU accepts (mixed-dtype
LayerNorm, a norm handing fp32 hidden states to half-precision weights), so a pass here is a pass a GPU would give.
Each axis is covered, not the cross product: six chains (sft + merge each, 1-2 steps) share their runs.

chain          family            dtype     quantization  after merge                      recipe it stands for
neox-fp16      GPT-NeoX fixture  float16   8bit          reward, ppo on it; grpo; dpo     gpt-neox-20b
neox-bf16      GPT-NeoX fixture  bfloat16  none          grpo
llama-bf16     Llama, untied     bfloat16  8bit          reward, ppo on it; grpo          llama-3.1-8b
llama-tied     Llama, tied       float16   none          ppo, grpo
qwen2-bf16     Qwen2, untied     bfloat16  8bit          ppo                              qwen2.5-14b
qwen2-nf4      Qwen2, untied     bfloat16  4bit          grpo                             qwen2.5-32b
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import cli

from rlhf.io import read_jsonl
from rlhf.testing.cuda_rules import cuda_rules

RECIPES = Path(__file__).resolve().parent.parent / "recipes"

# chain: (family, dtype, quantization, steps after merge)
CHAINS = {
    "neox-fp16": ("gpt_neox", "float16", "8bit", ("reward", "grpo", "dpo")),
    "neox-bf16": ("gpt_neox", "bfloat16", "none", ("grpo",)),
    "llama-bf16": ("llama", "bfloat16", "8bit", ("reward", "grpo")),
    "llama-tied": ("llama-tied", "float16", "none", ("ppo", "grpo")),
    "qwen2-bf16": ("qwen2", "bfloat16", "8bit", ("ppo",)),
    "qwen2-nf4": ("qwen2", "bfloat16", "4bit", ("grpo",)),
}
STEPS = [(chain, step) for chain, (*_, steps) in CHAINS.items() for step in steps]

# Small enough for seconds a step, big enough to run every phase (generation, scoring, update, evaluation).
SMALL = [
    "data.max_documents=32",
    "sft.max_steps=2", "sft.block_size=32", "sft.batch_size=2", "sft.logging_steps=1",
    "ppo.batch_size=2", "ppo.mini_batch_size=2", "ppo.rollout_batch_size=2", "ppo.ppo_epochs=1", "ppo.max_steps=1",
    "ppo.eval_prompts=2", "ppo.generation.min_new_tokens=2", "ppo.generation.max_new_tokens=4",
    "ppo.gradient_checkpointing=true",  # as the 20B recipe: the reentrant recompute runs under the rules too
    "grpo.batch_size=1", "grpo.group_size=2", "grpo.mini_batch_size=2", "grpo.rollout_batch_size=2", "grpo.epochs=1",
    "grpo.max_steps=1", "grpo.eval_prompts=2", "grpo.generation.min_new_tokens=2", "grpo.generation.max_new_tokens=4",
    "reward_model.max_steps=2", "reward_model.batch_size=2", "reward_model.eval_pairs=4",
    "dpo.max_steps=1", "dpo.batch_size=2", "dpo.eval_pairs=4",
    "lora.target_modules=auto", "ppo.lora.target_modules=auto", "grpo.lora.target_modules=auto",
    "reward_model.lora.target_modules=auto", "dpo.lora.target_modules=auto",
]  # fmt: skip

LLAMA = {"num_key_value_heads": 2, "tie_word_embeddings": False}
FAMILIES = {
    "llama": ("llama", LLAMA),
    "llama-tied": ("llama", {**LLAMA, "tie_word_embeddings": True}),
    "qwen2": ("qwen2", {**LLAMA, "max_window_layers": 2}),
}


def rules_cli(*args) -> int:
    with cuda_rules():
        return cli(*args)


def test_recipes_are_covered():
    """Each shipped recipe's model family, dtype and quantization is one chain's."""
    covered = {(family.split("-")[0], dtype, quantization) for family, dtype, quantization, _ in CHAINS.values()}
    for path in RECIPES.glob("*.yaml"):
        model = yaml.safe_load(path.read_text())["model"]
        if model["dtype"] == "float32":
            continue  # the quickstart's and memorize's: every other test runs them
        family = json.loads((Path(__file__).parent.parent / "rlhf/model_configs" / model["name"] / "config.json")
                            .read_text())["model_type"]  # fmt: skip
        assert (family, model["dtype"], model["quantization"]) in covered, path.name


@pytest.fixture(scope="session")
def half_models(tmp_path_factory, fixture_paths) -> dict[str, Path]:
    """Tiny random Llama (untied and tied) and Qwen2 around the fixture's tokenizer; GPT-NeoX is the fixture."""
    import torch
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    from rlhf.modeling import load_tokenizer

    tokenizer = load_tokenizer(fixture_paths.policy)
    eos = tokenizer.eos_token_id
    shape = {
        "vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "max_position_embeddings": 256, "bos_token_id": eos, "eos_token_id": eos,
        "pad_token_id": None,
    }  # fmt: skip
    root = tmp_path_factory.mktemp("half-models")
    models = {"gpt_neox": fixture_paths.policy}
    for name, (model_type, extra) in FAMILIES.items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(CONFIG_MAPPING[model_type](**shape, **extra))
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        models[name] = root / name
    return models


@pytest.fixture(scope="session")
def merged_chains(tmp_path_factory, half_models):
    """chain -> a run with `rlhf sft` and `rlhf merge` done under CUDA's rules (made on first use, then shared)."""
    root = tmp_path_factory.mktemp("half-chains")
    done: dict[str, Path] = {}

    def get(chain: str) -> Path:
        if chain not in done:
            family, dtype, quantization, _ = CHAINS[chain]
            run = root / chain
            overrides = [f"model.dtype={dtype}", f"model.quantization={quantization}", f"merge.dtype={dtype}"]
            sft = ["sft", "--recipe", "quickstart", "--model", half_models[family], "--run", run, "--force"]
            assert rules_cli(*sft, *overrides, *SMALL) == 0
            assert rules_cli("merge", "--run", run) == 0
            done[chain] = run
        return done[chain]

    return get


def finite(rows: list[dict], keys: tuple[str, ...]) -> None:
    assert rows, "no metrics written"
    for row in rows:
        for key in keys:
            assert isinstance(row.get(key), float | int) and math.isfinite(row[key]), (key, row.get(key))


@pytest.mark.parametrize("chain", CHAINS)
def test_sft_and_merge(chain, merged_chains):
    run = merged_chains(chain)
    _, dtype, _, _ = CHAINS[chain]
    finite([r for r in read_jsonl(run / "sft/metrics.jsonl") if "loss" in r], ("loss",))
    assert json.loads((run / "merged/config.json").read_text())["dtype"] == dtype
    record = json.loads((run / "merged/merge.json").read_text())
    assert record["max_abs_diff_logits"] is not None and math.isfinite(record["max_abs_diff_logits"])


@pytest.mark.parametrize("chain,step", STEPS)
def test_rl_and_reward_steps(chain, step, merged_chains, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(merged_chains(chain), run)
    if step == "reward":
        assert rules_cli("reward", "--run", run, "--force") == 0
        finite([r for r in read_jsonl(run / "reward/metrics.jsonl") if "loss" in r], ("loss",))
        assert math.isfinite(json.loads((run / "reward/eval.json").read_text())["accuracy_after"])
        # PPO scored by the learned reward on the same half-precision weights (the reward adapter switched on).
        assert rules_cli("ppo", "--run", run, "--reward", run / "reward", "--force") == 0
        step = "ppo"
    elif step == "dpo":
        assert rules_cli("dpo", "--run", run, "--force") == 0
        finite(read_jsonl(run / "dpo/metrics.jsonl"), ("loss", "chosen_reward", "rejected_reward", "chosen_nll"))
        evaluation = json.loads((run / "dpo/eval.json").read_text())
        assert all(math.isfinite(evaluation[k]) for k in ("loss_after", "reward_after", "kl_after"))
        return
    else:
        assert rules_cli(step, "--run", run, "--force") == 0
    keys = ("reward_mean", "kl", "policy_loss", "entropy") + (("value_loss",) if step == "ppo" else ("loss",))
    finite(read_jsonl(run / step / "metrics.jsonl"), keys)
    evaluation = json.loads((run / step / "eval.json").read_text())
    assert math.isfinite(evaluation["reward_after"]) and math.isfinite(evaluation["kl_after"])


def test_budget_counts_what_rmsnorms_keep_in_half_precision():
    """transformers' RMSNorms compute in fp32: in bf16 each keeps an fp32 copy of its input for backward (not the
    input), which the budget counts; a Llama layer's saved tensors measured against `layer_saved_per_token`."""
    import torch
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    from rlhf.budget import formulas
    from rlhf.budget.shapes import compute_shape

    config = CONFIG_MAPPING["llama"](
        vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2,
    )  # fmt: skip
    shape = compute_shape(json.dumps(config.to_dict()), "config.json", "tiny-llama", "causal-lm", False)
    assert shape.upcast_norms == 2
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16).requires_grad_(False)
    tokens, h = 64, 256
    x = torch.randn(1, tokens, h, dtype=torch.bfloat16, requires_grad=True)
    positions = torch.arange(tokens)[None]
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}
    in_norm: dict[int, int] = {}
    inside = []
    for norm in model.model.layers[0].modules():
        if "RMSNorm" in type(norm).__name__:
            norm.register_forward_pre_hook(lambda m, a: inside.append(1))
            norm.register_forward_hook(lambda m, a, o: inside.clear())

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in params:
            (in_norm if inside else saved)[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.model.layers[0](
            x, position_embeddings=model.model.rotary_emb(x, positions), position_ids=positions
        )  # fmt: skip
    # Each norm: its input's fp32 copy and the fp32 rsqrt per token.
    assert sum(in_norm.values()) == shape.upcast_norms * (4 * h + 4) * tokens
    measured = sum(saved.values()) + sum(in_norm.values())
    predicted = formulas.layer_saved_per_token(shape, formulas.TrainSetup("none", 2, 8, (), 0.0, "cpu"), tokens)
    assert predicted * tokens == pytest.approx(measured, rel=0.05)  # before the copies were counted: 26 % short
