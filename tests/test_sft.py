"""Step 1 on the real quantized path: bitsandbytes layers, k-bit preparation, LoRA training, the saved adapter."""

from __future__ import annotations

import json

import pytest
import torch
from bitsandbytes.nn import Linear4bit, Linear8bitLt

from rlhf import modeling
from rlhf.config import LoraConfig, ModelConfig, load_recipe
from rlhf.data import load_texts, tokenize_blocks
from rlhf.errors import UserError
from rlhf.resolve import resolve_model
from rlhf.runs import Run

TINY = "fixture:tiny-gpt-neox"


def _linears(model):
    return {
        name: m
        for name, m in model.named_modules()
        if name.endswith(("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"))
    }


def test_8bit_base_has_int8_linears(fixture_paths):
    model = modeling.load_base(ModelConfig(name=TINY, quantization="8bit", dtype="float32"), resolve_model(TINY))
    linears = _linears(model)
    assert len(linears) == 16  # 4 layers x 4 linears
    for m in linears.values():
        assert isinstance(m, Linear8bitLt) and m.weight.dtype == torch.int8
    assert not any(p.requires_grad for p in model.parameters())


def test_4bit_base_has_nf4_linears(fixture_paths):
    model = modeling.load_base(ModelConfig(name=TINY, quantization="4bit", dtype="float32"), resolve_model(TINY))
    for m in _linears(model).values():
        assert isinstance(m, Linear4bit) and m.weight.quant_type == "nf4"


def test_kbit_preparation_keeps_everything_in_the_model_dtype(fixture_paths):
    model = modeling.load_base(ModelConfig(name=TINY, quantization="8bit", dtype="float16"), resolve_model(TINY))
    modeling.prepare_for_training(model, gradient_checkpointing=True)
    # Norms in fp16 too: an fp32 LayerNorm weight meeting fp16 input is what CUDA's kernel refuses (tests/test_half.py).
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(p.dtype == torch.float16 for m in norms for p in m.parameters())
    # Embeddings stay as loaded (peft's preparation would make them fp32: +1.25 GB on gpt-neox-20b).
    assert model.gpt_neox.embed_in.weight.dtype == torch.float16
    assert model.get_output_embeddings().weight.dtype == torch.float16
    assert model.is_gradient_checkpointing


def test_lora_target_not_in_model_lists_linear_layers(fixture_paths):
    model = modeling.load_base(ModelConfig(name=TINY, quantization="none", dtype="float32"), resolve_model(TINY))
    with pytest.raises(UserError) as e:
        modeling.add_lora(model, LoraConfig(target_modules=["q_proj", "v_proj"]))
    assert "q_proj" in str(e.value) and "query_key_value" in str(e.value) and "dense_h_to_4h" in str(e.value)


def test_sft_trains_the_adapter_and_leaves_the_base(tmp_path, fixture_paths):
    from peft import PeftModel

    from rlhf import sft

    recipe = load_recipe("quickstart", ["sft.max_steps=12", "sft.logging_steps=3", "sft.learning_rate=3e-3"])
    result = sft.run(recipe, Run(tmp_path / "run"))
    trained = result.model.eval()

    # Every base parameter, the int8 weights included, is exactly as a fresh load gives it.
    fresh = modeling.load_base(recipe.model, resolve_model(TINY))
    fresh_params = dict(fresh.named_parameters())
    compared = 0
    for name, p in trained.get_base_model().named_parameters():
        if "lora_" not in name:
            assert torch.equal(p.data, fresh_params[name.replace(".base_layer", "")].data), name
            compared += p.dtype == torch.int8
    assert compared == 16

    lora_b = [p for n, p in trained.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b), "LoRA B starts at zero: it must have been trained"

    # Loss falls: the adapter lowers the loss on training blocks compared with the base alone.
    tokenizer = modeling.load_tokenizer(resolve_model(TINY))
    blocks = tokenize_blocks(load_texts(recipe.data, "train")[:64], tokenizer, recipe.sft.block_size, True)
    x = torch.tensor(blocks.input_ids[:8])
    with torch.no_grad():
        with trained.disable_adapter():
            base_loss = trained(input_ids=x, labels=x).loss.item()
        tuned_loss = trained(input_ids=x, labels=x).loss.item()
        tuned_logits = trained(input_ids=x).logits
    assert tuned_loss < base_loss - 0.003, (base_loss, tuned_loss)

    # The saved adapter loads with plain peft onto a freshly loaded base and reproduces the trained model.
    reloaded = PeftModel.from_pretrained(fresh, result.adapter).eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=x).logits, tuned_logits, atol=1e-4)

    run = Run(tmp_path / "run")
    rows = [json.loads(line) for line in (run.sft_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) >= 2 and all("loss" in r and "step" in r and "lr" in r for r in rows)
    assert (run.sft_adapter / "adapter_config.json").is_file() and run.recipe_path.is_file()
    config = json.loads((run.sft_adapter / "adapter_config.json").read_text())
    # A fixture (like any local model) is named by absolute path, which plain transformers/peft can load again.
    assert config["base_model_name_or_path"] == str(fixture_paths.policy.resolve()) and config["r"] == 16


def test_rerun_into_finished_run_is_refused(sft_run, copy_run, capsys):
    from conftest import cli

    run = copy_run(sft_run)
    before = (run / "sft" / "adapter" / "adapter_model.safetensors").read_bytes()
    assert cli("sft", "--recipe", "quickstart", "--run", run) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--resume" in err[0] and "--force" in err[0]
    assert (run / "sft" / "adapter" / "adapter_model.safetensors").read_bytes() == before


def test_resume_without_checkpoint_is_refused(tmp_path, capsys):
    from conftest import cli

    assert cli("sft", "--recipe", "quickstart", "--run", tmp_path / "nothing", "--resume") == 2
    assert "no SFT checkpoint" in capsys.readouterr().err


def test_packed_blocks_separate_documents_with_eos(fixture_paths):
    tokenizer = modeling.load_tokenizer(resolve_model(TINY))
    texts = ["a good film", "a bad film", "fine"]
    blocks = tokenize_blocks(texts, tokenizer, 4, pack=True)
    stream = [t for b in blocks.input_ids for t in b]
    assert stream.count(tokenizer.eos_token_id) >= 2
    assert blocks.labels == blocks.input_ids
    unpacked = tokenize_blocks(texts, tokenizer, 16, pack=False)
    # Padding is masked by position: the real EOS of each document still counts in the loss.
    for ids, labels, mask in zip(unpacked.input_ids, unpacked.labels, unpacked.attention_mask):
        n = sum(mask)
        assert ids[n - 1] == tokenizer.eos_token_id and labels[n - 1] == tokenizer.eos_token_id
        assert all(label == -100 for label in labels[n:])
