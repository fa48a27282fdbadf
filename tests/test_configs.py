"""Every shipped recipe, reward spec and model config loads and validates; recipe errors name the key and what is
allowed."""

from __future__ import annotations

import pytest

from rlhf.config import PACKAGE_DIR, available_recipes, load_recipe, recipes_dir
from rlhf.errors import UserError
from rlhf.rewards import load_spec

EXPECTED_RECIPES = {"gpt-neox-20b", "llama-3.1-8b", "qwen2.5-14b", "qwen2.5-32b", "quickstart", "memorize"}


@pytest.mark.parametrize("name", sorted(EXPECTED_RECIPES))
def test_shipped_recipe_loads(name):
    recipe = load_recipe(name)
    assert recipe.name == name
    text = (recipes_dir() / f"{name}.yaml").read_text()
    assert text.startswith("# rlhf "), "each recipe starts with the command that runs it"


def test_all_recipes_shipped():
    assert EXPECTED_RECIPES <= set(available_recipes())


@pytest.mark.parametrize("name", ["gpt-neox-20b", "llama-3.1-8b", "qwen2.5-14b"])
@pytest.mark.parametrize("step", ["sft", "ppo"])
def test_24gb_recipes_fit_24gib(name, step):
    from rlhf.budget import estimate, gpu_bytes

    assert estimate(load_recipe(name), step, gpu_bytes("24GiB")).fits


@pytest.mark.parametrize("step", ["sft", "reward", "ppo", "grpo", "dpo"])
def test_32b_recipe_fits_an_rtx4090_on_nf4(step):
    """The largest shipped model that RL-tunes on 24 GB: every training step of its recipe fits an RTX 4090."""
    from rlhf.budget import estimate, gpu_bytes

    recipe = load_recipe("qwen2.5-32b")
    assert recipe.model.quantization == "4bit" and recipe.merge.base_weights == "dequantized"
    assert estimate(recipe, step, gpu_bytes("rtx4090")).fits


def test_readme_fit_table_is_current():
    import importlib.util

    path = PACKAGE_DIR.parent / "benchmarks" / "fit_table.py"
    spec = importlib.util.spec_from_file_location("fit_table", path)
    fit_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fit_table)
    readme = fit_table.README.read_text()
    shown = readme[readme.index(fit_table.BEGIN) + len(fit_table.BEGIN) : readme.index(fit_table.END)].strip()
    assert shown == fit_table.text(), "README's fit tables are stale: run python benchmarks/fit_table.py --write"


@pytest.mark.parametrize("name", ["imdb-sentiment", "quickstart-sentiment"])
def test_shipped_reward_specs_load(name):
    spec = load_spec(name)
    assert spec.label == "POSITIVE" and spec.score == "logit"


# Published parameter counts (model cards, the Pythia paper); tied input/output embeddings count once.
PUBLISHED_PARAMETERS = {
    "EleutherAI/gpt-neox-20b": 20_554_567_680,
    "EleutherAI/pythia-12b": 11_846_072_320,
    "EleutherAI/pythia-1.4b": 1_414_647_808,
    "EleutherAI/pythia-160m": 162_322_944,
    "meta-llama/Llama-3.1-8B": 8_030_261_248,
    "meta-llama/Llama-3.2-3B": 3_212_749_824,
    "Qwen/Qwen2.5-7B": 7_615_616_512,
    "Qwen/Qwen2.5-14B": 14_770_033_664,
    "mistralai/Mistral-7B-v0.3": 7_248_023_552,
    "google/gemma-2-9b": 9_241_705_984,
    "google/gemma-2-27b": 27_227_128_320,
    "Qwen/Qwen2.5-32B": 32_763_876_352,
    "microsoft/phi-4": 14_659_507_200,
}


def test_shipped_model_configs_give_published_parameter_counts():
    """Each shipped causal-LM config.json builds, on the meta device, a model of exactly the published size: the shapes
    the budget reads are the real ones. (accelerate's init_empty_weights leaves tied embeddings untied in transformers
    5 and would count Gemma's and Llama-3.2's twice; the budget, like this test, builds on torch's meta device.)"""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    root = PACKAGE_DIR / "model_configs"
    shipped = {
        str(p.parent.relative_to(root))
        for p in root.glob("*/*/config.json")
        if "ForCausalLM" in AutoConfig.from_pretrained(p.parent).architectures[0]
    }
    assert shipped == set(PUBLISHED_PARAMETERS), "a shipped model config needs its published parameter count here"
    for name, published in PUBLISHED_PARAMETERS.items():
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(root / name))
        assert sum(p.numel() for p in model.parameters()) == published, name


def test_reference_hyperparameters():
    r = load_recipe("gpt-neox-20b")
    assert (r.lora.rank, r.lora.alpha, r.lora.dropout, r.lora.target_modules) == (16, 32, 0.05, ["query_key_value"])
    assert r.model.quantization == "8bit" and r.sft.block_size == 1024 and r.sft.gradient_checkpointing
    p = r.ppo
    assert (p.learning_rate, p.batch_size, p.mini_batch_size, p.ppo_epochs) == (1.41e-5, 256, 16, 4)
    assert (p.init_kl_coef, p.target_kl, p.kl_horizon, p.gamma, p.lam) == (0.2, 6, 10000, 1.0, 0.95)
    assert (p.cliprange, p.cliprange_value, p.vf_coef) == (0.2, 0.2, 0.1)
    assert (p.prompt_min_tokens, p.prompt_max_tokens, p.prompt_min_chars) == (2, 8, 200)
    g = p.generation
    assert (g.top_k, g.top_p, g.min_new_tokens, g.max_new_tokens, g.stop_at_eos) == (0, 1.0, 4, 16, False)
    # GRPO: PPO's prompts, generation, adapter and samples per step, without the value head
    q = r.grpo
    assert (q.group_size, q.advantage, q.beta, q.kl_in, q.epochs, q.cliprange) == (8, "grpo", 0.04, "loss", 1, 0.2)
    assert q.batch_size * q.group_size == p.batch_size and q.rollout_batch_size == p.rollout_batch_size
    assert q.mini_batch_size // q.gradient_accumulation_steps == p.mini_batch_size // p.gradient_accumulation_steps
    assert (q.generation, q.lora, q.learning_rate) == (p.generation, p.lora, p.learning_rate)
    assert (q.prompt_min_tokens, q.prompt_max_tokens, q.prompt_min_chars) == (2, 8, 200)


def test_override_sets_nested_value():
    r = load_recipe(
        "quickstart", ["ppo.mini_batch_size=8", "ppo.generation.max_new_tokens=12", "lora.target_modules=[a,b]"]
    )
    assert r.ppo.mini_batch_size == 8 and r.ppo.generation.max_new_tokens == 12
    assert r.lora.target_modules == ["a", "b"]


def test_typo_names_key_section_and_valid_keys():
    with pytest.raises(UserError) as e:
        load_recipe("quickstart", ["lora.rnak=8"])
    msg = str(e.value)
    assert "'lora.rnak'" in msg and "rank" in msg and "alpha" in msg and "\n" not in msg


def test_wrong_type_names_key_and_value():
    with pytest.raises(UserError) as e:
        load_recipe("quickstart", ["lora.rank=abc"])
    assert "'lora.rank'" in str(e.value) and "'abc'" in str(e.value) and "integer" in str(e.value)


def test_all_problems_reported_at_once():
    with pytest.raises(UserError) as e:
        load_recipe("quickstart", ["lora.rank=0", "sft.learning_rate=-1", "model.quantization=3bit", "foo=1"])
    msg = str(e.value)
    assert "4 problems" in msg
    for key in ("lora.rank", "sft.learning_rate", "model.quantization", "'foo'"):
        assert key in msg


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["ppo.mini_batch_size=300"], "mini_batch_size (300) must be <= batch_size (64)"),
        (
            ["ppo.batch_size=10", "ppo.mini_batch_size=4"],
            "batch_size (10) must be exactly divisible by mini_batch_size (4)",
        ),
        (["ppo.generation.min_new_tokens=20"], "min_new_tokens (20) must be <= max_new_tokens (16)"),
        (["grpo.group_size=1", "grpo.mini_batch_size=8"], "group_size (1) must be at least 2 with advantage=grpo"),
        (
            ["grpo.mini_batch_size=48"],
            "batch_size x group_size (8 x 8 = 64 sequences) must be exactly divisible by mini_batch_size (48)",
        ),  # fmt: skip
        (["grpo.mini_batch_size=128"], "mini_batch_size (128) must be <= batch_size x group_size (8 x 8 = 64"),
        (["grpo.lora.dropout=0.1"], "lora.dropout (0.1) must be 0"),
        (["grpo.kl_in=reward"], "kl_in=reward with advantage=grpo divides beta x KL by each group's score spread"),
    ],
)
def test_cross_field_checks_show_both_values(overrides, fragment):
    with pytest.raises(UserError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        load_recipe("quickstart", overrides)


def test_kl_in_the_reward_goes_with_rloo():
    """GRPO's advantage would divide beta x KL by each group's spread; RLOO's subtracts a mean (beta keeps its
    meaning), and without a KL (beta 0) there is nothing to rescale."""
    assert load_recipe("quickstart", ["grpo.kl_in=reward", "grpo.advantage=rloo"]).grpo.kl_in == "reward"
    assert load_recipe("quickstart", ["grpo.kl_in=reward", "grpo.beta=0"]).grpo.beta == 0


def test_unknown_recipe_lists_available():
    with pytest.raises(UserError) as e:
        load_recipe("no-such-recipe")
    assert "quickstart" in str(e.value) and "gpt-neox-20b" in str(e.value)


def test_malformed_yaml_names_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name: x\n lora: [\n")
    with pytest.raises(UserError) as e:
        load_recipe(str(bad))
    assert "line" in str(e.value) and "malformed YAML" in str(e.value)
