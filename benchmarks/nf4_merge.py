"""The merge after 4-bit training, measured: an SFT adapter trained on an NF4 base, merged into the original weights
(`merge.base_weights=original`) and into their NF4 dequantization (`dequantized`), at GPT-NeoX's and Llama's shapes.

    python benchmarks/nf4_merge.py            # a few minutes on a CPU

For each shape: 4-bit `rlhf sft` on the fixture corpus, then both merges. Reported: the merge's own logit probe
(max |logits| difference on random ids against the original base + adapter and against the NF4 base + adapter, the
model that was trained), and the held-out loss (mean token NLL on the fixture's test reviews) of the model as trained,
of each merged model at fp32, and of each merged model loaded in NF4 again (what `rlhf ppo`/`rlhf grpo` train on next).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rlhf import modeling  # noqa: E402
from rlhf.cli import main as rlhf  # noqa: E402
from rlhf.config import DataConfig, ModelConfig  # noqa: E402
from rlhf.data import load_texts, tokenize_blocks  # noqa: E402
from rlhf.fixtures import ensure_fixtures  # noqa: E402

SHAPES = {
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


def tiny_llama(root: Path, policy: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = modeling.load_tokenizer(policy)
    eos = tokenizer.eos_token_id
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=eos, eos_token_id=eos, tie_word_embeddings=False)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(root / "llama")
    tokenizer.save_pretrained(root / "llama")
    return root / "llama"


@torch.no_grad()
def held_out_loss(model, blocks: torch.Tensor) -> float:
    model.eval()
    return sum(float(model(input_ids=b[None], labels=b[None]).loss) for b in blocks) / len(blocks)


def measure(shape: str, base: Path, root: Path, steps: int) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    lora = {"rank": 16, "alpha": 32, "dropout": 0.0, "target_modules": SHAPES[shape]}
    recipe = {
        "name": f"nf4-merge-{shape}",
        "model": {"name": str(base), "quantization": "4bit", "dtype": "float32"},
        "lora": lora,
        "data": {"dataset": "fixture:imdb"},
        "sft": {"block_size": 128, "batch_size": 8, "max_steps": steps, "learning_rate": 1e-3, "report_to": []},
        "merge": {"dtype": "float16"},
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    run = root / "run"
    assert rlhf(["sft", "--recipe", str(root / "recipe.yaml"), "--run", str(run)]) == 0
    merged = {}
    for choice in ("original", "dequantized"):
        assert rlhf(["merge", "--run", str(run), "--force", "--base-weights", choice]) == 0
        merged[choice] = root / f"merged-{choice}"
        shutil.copytree(run / "merged", merged[choice])
    probes = {c: json.loads((merged[c] / "merge.json").read_text()) for c in merged}

    tokenizer = modeling.load_tokenizer(base)
    texts = load_texts(DataConfig(dataset="fixture:imdb"), "test")[:200]
    blocks = torch.as_tensor(tokenize_blocks(texts, tokenizer, 128, True).input_ids[:64])
    nf4 = ModelConfig(name=str(base), quantization="4bit", dtype="float32")
    losses = {
        "NF4 base + adapter (as trained)": held_out_loss(
            PeftModel.from_pretrained(modeling.load_base(nf4, base), run / "sft/adapter"), blocks
        ),
        "fp32 original base + adapter": held_out_loss(
            PeftModel.from_pretrained(
                AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), run / "sft/adapter"
            ),
            blocks,
        ),
        "NF4 base alone": held_out_loss(modeling.load_base(nf4, base), blocks),
    }
    for choice, path in merged.items():
        losses[f"merged ({choice}), fp32"] = held_out_loss(
            AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), blocks
        )
        losses[f"merged ({choice}), loaded in NF4"] = held_out_loss(modeling.load_base(nf4, path), blocks)
    return {
        "steps": steps,
        "probe": {
            c: {"vs_original": p["max_abs_diff_logits_vs_original"], "vs_trained": p["max_abs_diff_logits_vs_trained"]}
            for c, p in probes.items()
        },
        "held_out_loss": losses,
        "blocks": len(blocks),
    }


def main() -> None:
    torch.set_num_threads(1)
    paths = ensure_fixtures(progress=False)
    results = {}
    with tempfile.TemporaryDirectory(prefix="rlhf-nf4-merge-") as tmp:
        for shape, steps in (("gpt_neox", 60), ("llama", 120)):
            root = Path(tmp) / shape
            root.mkdir()
            base = paths.policy if shape == "gpt_neox" else tiny_llama(root, paths.policy)
            results[shape] = measure(shape, base, root, steps)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
