"""`lora.target_modules` resolved to layer names: from names alone (what the budget has) and from a model."""

from __future__ import annotations

import pytest

from rlhf.errors import UserError
from rlhf.targets import resolve_targets

NEOX = ["dense", "dense_4h_to_h", "dense_h_to_4h", "query_key_value"]
LLAMA = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


@pytest.mark.parametrize(
    "requested, model_type, names, expected",
    [
        ("auto", "gpt_neox", NEOX, ["query_key_value"]),  # the reference recipe's target
        ("auto", "llama", LLAMA, LLAMA),
        ("auto", "some_new_family", ["w_in", "w_out"], ["w_in", "w_out"]),  # unknown family: every linear layer
        ("all-linear", "gpt_neox", NEOX, NEOX),
        (["v_proj", "q_proj", "q_proj"], "llama", LLAMA, ["q_proj", "v_proj"]),
    ],
)
def test_resolve_targets(requested, model_type, names, expected):
    assert resolve_targets(requested, model_type, reversed(names)) == expected


def test_unknown_target_lists_the_linear_layers():
    with pytest.raises(UserError) as e:
        resolve_targets(["q_proj", "dense"], "gpt_neox", NEOX)
    msg = str(e.value)
    assert "['q_proj']" in msg and "query_key_value" in msg and "dense_4h_to_h" in msg and "\n" not in msg


def test_no_linear_layers_is_an_error():
    with pytest.raises(UserError, match="no linear layers"):
        resolve_targets("auto", "mamba", [])


@pytest.mark.parametrize(
    "name, expected, lora_params",
    [
        ("EleutherAI/gpt-neox-20b", ["query_key_value"], 44 * 16 * (6144 + 3 * 6144)),
        ("meta-llama/Llama-3.1-8B", LLAMA, 32 * 16 * (2 * 8192 + 2 * 5120 + 3 * (4096 + 14336))),
        ("google/gemma-2-9b", LLAMA, 42 * 16 * (2 * (3584 + 4096) + 2 * (3584 + 2048) + 3 * (3584 + 14336))),
        ("microsoft/phi-4", ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"],
         40 * 16 * ((5120 + 7680) + 2 * 5120 + (5120 + 2 * 17920) + (17920 + 5120))),
    ],
)  # fmt: skip
def test_default_targets_of_shipped_configs_on_the_meta_device(name, expected, lora_params):
    """The names a shape-only caller (the budget) gets: the output head is never one, tied (Gemma) or not; the LoRA
    size follows by hand from the published shapes (r=16: r x (in + out) per adapted layer)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from rlhf import modeling
    from rlhf.config import PACKAGE_DIR, LoraConfig

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(PACKAGE_DIR / "model_configs" / name))
    targets = modeling.resolve_targets(model, LoraConfig())
    assert targets == expected
    linears = [(n.rsplit(".", 1)[-1], m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert sum(16 * (m.in_features + m.out_features) for short, m in linears if short in targets) == lora_params


@pytest.mark.parametrize("recipe", ["quickstart", "memorize"])
def test_tiny_recipes_fit_a_model_the_user_brings(recipe):
    """`rlhf sft --recipe quickstart --model ./my-llama`: every LoRA section of the recipes meant for any model names
    targets that exist in another family too, and resolve on GPT-NeoX to what the quickstart was tuned with."""
    from rlhf.config import load_recipe

    r = load_recipe(recipe)
    sections = {
        "lora": r.lora,
        "ppo.lora": r.ppo.lora,
        "grpo.lora": r.grpo.lora,
        "reward_model.lora": r.reward_model.lora,
    }
    for name, lora in sections.items():
        assert resolve_targets(lora.target_modules, "llama", LLAMA), name  # no UserError
    if recipe == "quickstart":
        assert resolve_targets(r.lora.target_modules, "gpt_neox", NEOX) == ["query_key_value"]
        for name in ("ppo.lora", "grpo.lora", "reward_model.lora"):
            assert resolve_targets(sections[name].target_modules, "gpt_neox", NEOX) == NEOX, name
