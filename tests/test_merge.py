"""`rlhf merge` on tiny random models: the merged model is base + adapter, and the base is untouched.

Tolerances. Weights: every merged element within one fp16 rounding step of peft's own merge_and_unload in fp32
(|got - want| <= eps16 * |want| + 1e-6; eps16 = 2**-10). Logits: within LOGITS_ATOL of the fp32 base + adapter
through peft — on these models the fp16 rounding of all weights moves logits by about 5e-4.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from pathlib import Path

import psutil
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from rlhf import budget, merge
from rlhf.config import LoraConfig as RecipeLora
from rlhf.config import ModelConfig, Recipe
from rlhf.errors import DoesNotFit, UserError
from rlhf.merge import adapters as merge_adapters
from rlhf.merge.adapters import plan_merge, read_adapter
from rlhf.merge.ram import largest_working_set
from rlhf.runs import Run
from rlhf.tensorfiles import checkpoint_entries

LOGITS_ATOL = 1e-2
EPS16 = torch.finfo(torch.float16).eps

warnings.filterwarnings("ignore", module="peft")


# --- tiny models and adapters -----------------------------------------------------------------------------------


def save_model(model, path: Path, **kwargs) -> Path:
    model.save_pretrained(path, **kwargs)
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(128)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="w0").save_pretrained(path)
    GenerationConfig(max_new_tokens=7, do_sample=True).save_pretrained(path)
    return path


def neox() -> GPTNeoXForCausalLM:
    torch.manual_seed(0)
    config = GPTNeoXConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=128,
        max_position_embeddings=64,
    )
    return GPTNeoXForCausalLM(config)


def make_adapter(base_dir: Path, path: Path, seed: int = 1, **lora) -> Path:
    """A LoRA adapter with random, non-zero B (init_lora_weights=False), saved by peft."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    lora.setdefault("target_modules", ["query_key_value"])
    get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **lora)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    paths = {"neox": save_model(neox(), root / "neox")}
    paths["neox_sharded"] = save_model(neox(), root / "neox-sharded", max_shard_size="20KB")
    torch.manual_seed(0)
    llama = LlamaConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=128,
        max_position_embeddings=64,
    )
    paths["llama"] = save_model(LlamaForCausalLM(llama), root / "llama")
    torch.manual_seed(0)
    gpt2 = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=64)
    paths["gpt2"] = save_model(GPT2LMHeadModel(gpt2), root / "gpt2")
    paths["adapter"] = make_adapter(paths["neox"], root / "adapter")
    return paths


def peft_merged(base_dir: Path, adapter_dir: Path) -> dict[str, torch.Tensor]:
    """peft's own merge, in fp32 on the whole model: the reference the streaming merge must reproduce."""
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(model, adapter_dir).merge_and_unload().state_dict()


def loaded(path: Path) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()


def assert_fp16_rounding_of(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name, value in want.items():
        error = (got[name] - value).abs()
        assert (error <= EPS16 * value.abs() + 1e-6).all(), f"{name}: off by up to {error.max():.3g}"


def logits_diff(base_dir: Path, adapter_dir: Path, merged_dir: Path) -> float:
    ids = torch.randint(0, 128, (3, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        want = PeftModel.from_pretrained(base, adapter_dir)(input_ids=ids).logits
        got = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)(input_ids=ids).logits
    return float((got - want).abs().max())


def tree_hash(path: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(file.name.encode() + file.read_bytes())
    return digest.hexdigest()


def make_run(root: Path, base_dir: Path, adapter_dir: Path | None, **merge_settings) -> Run:
    run = Run(root)
    root.mkdir(parents=True)
    recipe = Recipe(model=ModelConfig(name=str(base_dir), quantization="none"))
    for key, value in merge_settings.items():
        setattr(recipe.merge, key, value)
    run.write_recipe(recipe)
    if adapter_dir is not None:
        shutil.copytree(adapter_dir, run.sft_adapter)
    return run


# --- the merged model is base + adapter -------------------------------------------------------------------------


def test_merged_model_equals_base_plus_adapter(models, tmp_path):
    base_before = tree_hash(models["neox"])
    result = merge.merge_checkpoint(models["neox"], models["adapter"], tmp_path / "merged", progress=False)

    assert_fp16_rounding_of(loaded(tmp_path / "merged"), peft_merged(models["neox"], models["adapter"]))
    assert logits_diff(models["neox"], models["adapter"], tmp_path / "merged") < LOGITS_ATOL
    assert result.max_abs_diff_logits is not None and result.max_abs_diff_logits < LOGITS_ATOL
    assert 0 < result.max_abs_diff_weights < 1e-2
    assert result.merged_tensors == 2  # query_key_value in each of the 2 layers
    assert tree_hash(models["neox"]) == base_before
    # the adapter really changes the model: a merge that forgot it would fail the checks above
    assert logits_diff(models["neox"], models["adapter"], models["neox"]) > 10 * LOGITS_ATOL


def test_merged_dir_is_a_normal_model(models, tmp_path):
    out = tmp_path / "merged"
    merge.merge_checkpoint(models["neox"], models["adapter"], out, max_shard_size="30KB", progress=False)

    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert AutoConfig.from_pretrained(out).dtype == torch.float16
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    assert all(t.dtype == torch.float16 for shard in shards for t in load_file(shard).values())
    assert sorted(set(index["weight_map"].values())) == [p.name for p in shards] and len(shards) > 1
    assert all(p.stat().st_size <= 30_000 + 2_000 for p in shards)  # tensor bytes <= 30 KB, plus each header
    assert GenerationConfig.from_pretrained(out).max_new_tokens == 7
    assert AutoTokenizer.from_pretrained(out)("w3 w4")["input_ids"] == [3, 4]
    card = (out / "README.md").read_text()
    assert str(models["neox"]) in card and str(models["adapter"]) in card and "Merged on" in card
    assert not list(tmp_path.glob(".merged.*"))  # the temporary dir was renamed, not left beside


@pytest.mark.parametrize("base", ["neox_sharded", "llama"])
def test_sharded_and_llama_checkpoints(models, tmp_path, base):
    targets = ["q_proj", "v_proj"] if base == "llama" else ["query_key_value", "dense_4h_to_h"]
    adapter = make_adapter(models[base], tmp_path / "adapter", target_modules=targets)
    merge.merge_checkpoint(models[base], adapter, tmp_path / "merged", progress=False)
    assert_fp16_rounding_of(loaded(tmp_path / "merged"), peft_merged(models[base], adapter))
    assert logits_diff(models[base], adapter, tmp_path / "merged") < LOGITS_ATOL


def test_rslora_patterns_and_saved_biases(models, tmp_path):
    adapter = make_adapter(
        models["neox"],
        tmp_path / "adapter",
        target_modules=["query_key_value", "dense_h_to_4h", "lm_head"],
        use_rslora=True,
        rank_pattern={"layers.1.attention.query_key_value": 2},
        alpha_pattern={"dense_h_to_4h": 3},
        bias="lora_only",  # the adapter saves the targeted layers' biases: they replace the base's
    )
    state = load_file(adapter / "adapter_model.safetensors")
    key = "base_model.model.gpt_neox.layers.0.attention.query_key_value.base_layer.bias"
    state[key] = state[key] + 0.5  # as if training had moved it
    from safetensors.torch import save_file

    save_file(state, adapter / "adapter_model.safetensors")
    merge.merge_checkpoint(models["neox"], adapter, tmp_path / "merged", progress=False)
    assert_fp16_rounding_of(loaded(tmp_path / "merged"), peft_merged(models["neox"], adapter))


def test_lora_bias_is_added_to_the_base_bias(models, tmp_path):
    adapter = make_adapter(models["neox"], tmp_path / "adapter", lora_bias=True)
    assert any(k.endswith("lora_B.bias") for k in load_file(adapter / "adapter_model.safetensors"))
    merge.merge_checkpoint(models["neox"], adapter, tmp_path / "merged", progress=False)
    assert_fp16_rounding_of(loaded(tmp_path / "merged"), peft_merged(models["neox"], adapter))


def test_fan_in_fan_out_gives_peft_delta(models, tmp_path):
    adapter = make_adapter(models["gpt2"], tmp_path / "adapter", target_modules=["c_attn"], fan_in_fan_out=True)
    out = merge.merge_checkpoint(models["gpt2"], adapter, tmp_path / "merged", progress=False).output_dir

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(models["gpt2"]), adapter)
    layer = model.base_model.model.transformer.h[1].attn.c_attn
    want = layer.base_layer.weight + layer.get_delta_weight("default")  # (in, out), as GPT-2's Conv1D stores it
    got = load_file(out / "model.safetensors")["transformer.h.1.attn.c_attn.weight"].float()
    assert got.shape == want.shape == (32, 96)
    assert ((got - want).abs() <= EPS16 * want.abs() + 1e-6).all()
    assert_fp16_rounding_of(loaded(out), peft_merged(models["gpt2"], adapter))


def test_key_map_tolerates_prefixes_and_renames():
    keys = ["gpt_neox.layers.0.attention.query_key_value.weight", "embed_out.weight", "layers.1.mlp.up.weight"]
    key_map = merge.KeyMap(keys, {"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox"})
    assert key_map.find("gpt_neox.layers.0.attention.query_key_value.weight") == keys[0]
    assert key_map.find("layers.0.attention.query_key_value.weight") == keys[0]  # no prefix in the adapter
    assert key_map.find("model.layers.1.mlp.up.weight") == keys[2]  # no prefix in the checkpoint
    assert key_map.find("lm_head.weight") == "embed_out.weight"  # transformers 5 renames embed_out on load
    assert key_map.find("layers.0.attention.dense.weight") is None


# --- the run: already merged, --force, several adapters ---------------------------------------------------------


def test_run_merges_once_and_force_redoes(models, tmp_path, capsys):
    run = make_run(tmp_path / "run", models["neox"], models["adapter"])
    first = merge.run(str(run.root))
    assert not first.already_merged and first.output_dir == run.merged
    assert first.peak_rss_bytes > 0 and first.seconds > 0
    card = (run.merged / "README.md").read_text()
    assert "stanfordnlp/imdb" in card and "recipe.yaml" in card and str(models["neox"]) in card
    files = {p.name: p.stat().st_mtime_ns for p in run.merged.iterdir()}
    contents = tree_hash(run.merged)
    capsys.readouterr()

    second = merge.run(str(run.root))
    assert second.already_merged and "already merged" in capsys.readouterr().out
    assert second.max_abs_diff_weights == first.max_abs_diff_weights
    assert tree_hash(run.merged) == contents
    assert {p.name: p.stat().st_mtime_ns for p in run.merged.iterdir()} == files

    forced = merge.run(str(run.root), force=True)
    assert not forced.already_merged
    assert (run.merged / "model.safetensors").stat().st_mtime_ns != files["model.safetensors"]
    assert_fp16_rounding_of(loaded(run.merged), peft_merged(models["neox"], models["adapter"]))

    with pytest.raises(UserError, match="--force"):  # a merge of other inputs is not "already merged"
        merge.run(str(run.root), dtype="bfloat16")
    assert merge.run(str(run.root), dtype="bfloat16", force=True).dtype == "bfloat16"
    assert AutoConfig.from_pretrained(run.merged).dtype == torch.bfloat16


@pytest.mark.parametrize("method", ["linear", "cat"])
@pytest.mark.parametrize("rslora", [False, True])
def test_weights_one_zero_equal_the_single_adapter_merge(models, tmp_path, method, rslora):
    first = make_adapter(models["neox"], tmp_path / "a", seed=1, use_rslora=rslora)
    second = make_adapter(models["neox"], tmp_path / "b", seed=2, use_rslora=rslora)
    single = merge.run(str(make_run(tmp_path / "single", models["neox"], first).root))
    both = merge.run(
        str(make_run(tmp_path / "both", models["neox"], None).root),
        adapters=[str(first), str(second)],
        weights=[1.0, 0.0],
        method=method,
    )
    want, got = loaded(single.output_dir), loaded(both.output_dir)
    for name in want:  # the same fp32 result up to summation order: equal, or one fp16 step apart
        assert ((got[name] - want[name]).abs() <= EPS16 * want[name].abs()).all(), name
    assert both.max_abs_diff_logits < LOGITS_ATOL


def test_ties_and_dare_ties_merge(models, tmp_path):
    first = make_adapter(models["neox"], tmp_path / "a", seed=1)
    second = make_adapter(models["neox"], tmp_path / "b", seed=2)
    for method in ("ties", "dare_ties"):
        run = make_run(tmp_path / method, models["neox"], None)
        result = merge.run(str(run.root), adapters=[str(first), str(second)], weights=[0.7, 0.3], method=method)
        assert result.max_abs_diff_logits < LOGITS_ATOL


# --- errors -----------------------------------------------------------------------------------------------------


def test_run_without_sft_adapter_says_run_sft(models, tmp_path):
    run = make_run(tmp_path / "run", models["neox"], None)
    with pytest.raises(UserError, match="rlhf sft"):
        merge.run(str(run.root))


def test_weights_must_match_adapters(models, tmp_path):
    run = make_run(tmp_path / "run", models["neox"], None)
    with pytest.raises(UserError, match="2 adapters but 3 weights"):
        merge.run(str(run.root), adapters=[str(models["adapter"])] * 2, weights=[1, 0, 0])
    with pytest.raises(UserError, match="--method"):
        merge.run(str(run.root), adapters=[str(models["adapter"])] * 2, weights=[1, 0], method="svd")


def test_adapter_for_another_base_is_refused(models, tmp_path):
    adapter = shutil.copytree(models["adapter"], tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "EleutherAI/pythia-70m"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    run = make_run(tmp_path / "run", models["neox"], adapter)
    with pytest.raises(UserError, match="pythia-70m"):
        merge.run(str(run.root))
    assert not run.merged.exists()


def test_adapter_for_the_same_base_by_another_path_is_accepted(models, tmp_path):
    link = tmp_path / "neox-link"
    link.symlink_to(models["neox"])
    run = make_run(tmp_path / "run", link, models["adapter"])  # recipe says the link, adapter says the target
    assert merge.run(str(run.root)).max_abs_diff_logits < LOGITS_ATOL


def test_quantized_base_is_refused(models, tmp_path):
    base = shutil.copytree(models["neox"], tmp_path / "neox-8bit")
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    (base / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="quantized"):
        merge.merge_checkpoint(base, models["adapter"], tmp_path / "merged", progress=False)
    assert not (tmp_path / "merged").exists()


def test_dora_adapter_is_refused(models, tmp_path):
    adapter = make_adapter(models["neox"], tmp_path / "dora", use_dora=True)
    run = make_run(tmp_path / "run", models["neox"], adapter)
    with pytest.raises(UserError, match="DoRA"):
        merge.run(str(run.root))


def test_a_wrong_merge_fails_the_check_and_leaves_nothing(models, tmp_path, monkeypatch):
    run = make_run(tmp_path / "run", models["neox"], models["adapter"])
    real = merge_adapters.lora_scaling
    monkeypatch.setattr(merge_adapters, "lora_scaling", lambda config, module, rank: real(config, module, rank) * 1.01)
    with pytest.raises(merge.MergeCheckFailed, match="query_key_value"):
        merge.run(str(run.root))
    assert not run.merged.exists() and not list(run.root.glob(".merged*"))
    assert merge.MergeCheckFailed.exit_code == 1


def test_logits_over_tolerance_fail(models, tmp_path):
    run = make_run(tmp_path / "run", models["neox"], models["adapter"], tolerance=1e-9)
    with pytest.raises(merge.MergeCheckFailed, match="tolerance"):
        merge.run(str(run.root))
    assert not run.merged.exists()


def test_not_enough_ram_is_refused_unless_forced(models, tmp_path, monkeypatch):
    class Tiny:
        available = 1024

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Tiny())
    with pytest.raises(DoesNotFit, match="RAM"):
        merge.merge_checkpoint(models["neox"], models["adapter"], tmp_path / "merged", progress=False)
    result = merge.merge_checkpoint(models["neox"], models["adapter"], tmp_path / "merged", force=True)
    assert result.max_abs_diff_logits is None  # too little RAM for the probe: the in-stream check still ran
    assert result.max_abs_diff_weights > 0


def test_budget_plans_a_merge_by_the_merges_own_formula(models):
    """`rlhf budget` sizes a merge from shapes with the merge's own RAM formula: the same largest tensor, the same
    adapter bytes as the merge computes from the checkpoint."""
    recipe = Recipe(model=ModelConfig(name=str(models["neox"]), quantization="none"), lora=RecipeLora(rank=4))
    est = budget.estimate(recipe, "merge", 1 << 40)
    entries = checkpoint_entries(models["neox"])
    adapter = read_adapter(models["adapter"])
    plan = plan_merge(entries, adapter, json.loads((models["neox"] / "config.json").read_text()))
    qkv = 96 * 32 * (4 + 8 + 2)  # fp32 base, two fp32 tensors, fp16 output: nothing else
    assert est.components["weights"] == largest_working_set(entries, plan, torch.float16) == qkv
    assert est.components["lora"] == 2 * adapter.nbytes


def test_max_shard_size():
    assert merge.max_shard_bytes("2GB") == 2 * 10**9
    assert merge.max_shard_bytes("500 MiB") == 500 * 2**20
    assert merge.max_shard_bytes("1000") == 1000  # a plain number is bytes, as transformers reads max_shard_size
    with pytest.raises(UserError, match="max_shard_size"):
        merge.max_shard_bytes("big")
