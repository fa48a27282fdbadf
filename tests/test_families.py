"""The model families users bring, through the whole flow with the default LoRA targets: sft (8-bit) -> merge -> ppo.

Each family is a tiny random model built from its transformers config (2 layers, width 64, GQA where the family has
it) around the fixture's tokenizer; Qwen2 and Gemma2 tie the output head to the input embedding, as the small Qwen2.5
models and every Gemma do. The recipe names no `lora.target_modules`: the default must fit every family.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from conftest import cli

from rlhf.io import read_jsonl

PROJECTIONS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]

# model_type: (config beyond the common shape, the layers the default targets must adapt)
FAMILIES = {
    "gpt_neox": ({"tie_word_embeddings": False}, ["query_key_value"]),
    "llama": ({"num_key_value_heads": 2, "tie_word_embeddings": False}, PROJECTIONS),
    "mistral": ({"num_key_value_heads": 2, "tie_word_embeddings": False}, PROJECTIONS),
    "qwen2": ({"num_key_value_heads": 2, "tie_word_embeddings": True}, PROJECTIONS),
    "gemma2": (
        {"num_key_value_heads": 2, "head_dim": 16, "query_pre_attn_scalar": 16, "tie_word_embeddings": True},
        PROJECTIONS,
    ),
    "phi3": (
        {"num_key_value_heads": 2, "original_max_position_embeddings": 256, "tie_word_embeddings": False},
        ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"],
    ),
}


@pytest.fixture(scope="session")
def family_models(tmp_path_factory, fixture_paths) -> dict[str, Path]:
    """One tiny random model directory per family, with the fixture's BPE tokenizer (vocabulary sized to it)."""
    import torch
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    from rlhf.modeling import load_tokenizer

    tokenizer = load_tokenizer(fixture_paths.policy)
    eos = tokenizer.eos_token_id
    shape = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 256,
        "bos_token_id": eos,
        "eos_token_id": eos,
        "pad_token_id": None,
    }
    root = tmp_path_factory.mktemp("families")
    models = {}
    for family, (extra, _) in FAMILIES.items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(CONFIG_MAPPING[family](**shape, **extra))
        models[family] = root / family
        model.save_pretrained(models[family])
        tokenizer.save_pretrained(models[family])
    return models


def _targets(adapter: Path) -> list[str]:
    return sorted(json.loads((adapter / "adapter_config.json").read_text())["target_modules"])


@pytest.mark.parametrize("family", FAMILIES)
def test_family_runs_sft_merge_ppo_with_default_targets(family, family_models, tmp_path):
    expected = FAMILIES[family][1]
    recipe = {
        "name": f"tiny-{family}",
        "model": {"name": str(family_models[family]), "quantization": "8bit", "dtype": "float32"},
        "data": {"dataset": "fixture:imdb", "max_documents": 64},
        "sft": {"block_size": 64, "batch_size": 4, "max_steps": 3, "logging_steps": 1, "report_to": []},
        "ppo": {
            "batch_size": 4,
            "mini_batch_size": 2,
            "rollout_batch_size": 4,
            "ppo_epochs": 1,
            "max_steps": 2,
            "eval_prompts": 4,
            "generation": {"min_new_tokens": 2, "max_new_tokens": 4},
        },
        "reward": {"name": "quickstart-sentiment"},
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    run = tmp_path / "run"

    assert cli("sft", "--recipe", tmp_path / "recipe.yaml", "--run", run) == 0
    assert _targets(run / "sft/adapter") == expected
    assert f"targets {', '.join(expected)}" in (run / "sft/adapter/README.md").read_text()

    assert cli("merge", "--run", run) == 0
    record = json.loads((run / "merged/merge.json").read_text())
    # The merge's own check: the merged model's logits equal the fp32 base + adapter (a tied head merged or saved
    # wrongly would break it).
    assert record["max_abs_diff_logits"] is not None and record["max_abs_diff_logits"] <= 5e-2
    assert f"targets {', '.join(expected)}" in (run / "merged/README.md").read_text()
    tied = FAMILIES[family][0]["tie_word_embeddings"]
    assert json.loads((run / "merged/config.json").read_text()).get("tie_word_embeddings", False) == tied

    assert cli("ppo", "--run", run) == 0
    assert _targets(run / "ppo/adapter") == expected
    assert f"targets {', '.join(expected)}" in (run / "ppo/adapter/README.md").read_text()
    rows = read_jsonl(run / "ppo/metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r[k]) for r in rows for k in ("reward_mean", "kl", "policy_loss", "value_loss"))
