"""Model shapes as plain JSON: the shipped ones match their configs, others are cached by config text, and with either
`rlhf budget` answers without importing torch or transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf.budget import shapes
from rlhf.budget.shapes import model_shape, shape_cache_path, shipped_configs_dir, shipped_shape_text

SHIPPED = sorted(shipped_configs_dir().glob("*/*/config.json"))

# A Llama (grouped-query attention, gated MLP) small enough to build in a blink.
TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 500,
    "max_position_embeddings": 128,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}


@pytest.mark.parametrize("config", SHIPPED, ids=[str(p.parent.relative_to(shipped_configs_dir())) for p in SHIPPED])
def test_shipped_shape_is_what_its_config_builds(config):
    shipped = config.with_name("shape.json")
    fix = "run python benchmarks/write_shapes.py"
    assert shipped.is_file(), f"{shipped} is missing: {fix}"
    assert shipped.read_text() == shipped_shape_text(config), f"{shipped} is stale: {fix}"


@pytest.fixture
def private_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("RLHF_CACHE", str(tmp_path / "cache"))
    shapes._shape.cache_clear()  # the in-process memo would hide what is on disk
    yield tmp_path / "cache"
    shapes._shape.cache_clear()


def write_config(path: Path, **changes) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(TINY_LLAMA | changes))
    return path


def test_other_configs_are_cached_by_their_text(private_cache, tmp_path):
    model = write_config(tmp_path / "tiny-llama")
    computed = model_shape(str(model))
    cached = shape_cache_path((model / "config.json").read_text(), "causal-lm", False)
    assert cached.is_relative_to(private_cache) and cached.is_file()
    inode = cached.stat().st_ino
    shapes._shape.cache_clear()
    assert model_shape(str(model)) == computed  # read back exactly, every linear included ...
    assert cached.stat().st_ino == inode  # ... from the file, not computed and written again
    assert (computed.layers, computed.kv_heads, computed.gated_mlp) == (2, 2, True)

    write_config(model, num_hidden_layers=3)  # a changed config is a new key, never the stale shape
    assert model_shape(str(model)).layers == 3


def test_a_damaged_cache_file_is_computed_again(private_cache, tmp_path):
    model = write_config(tmp_path / "tiny-llama")
    computed = model_shape(str(model))
    cached = shape_cache_path((model / "config.json").read_text(), "causal-lm", False)
    cached.write_text(cached.read_text()[:100])  # cut short
    shapes._shape.cache_clear()
    assert model_shape(str(model)) == computed
    assert json.loads(cached.read_text())["params"] == computed.params


def run_python(code: str, cache: Path) -> dict:
    env = os.environ | {"RLHF_CACHE": str(cache), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "trl", "accelerate", "datasets")


def test_budget_with_shipped_and_cached_shapes_imports_no_torch(private_cache, tmp_path):
    """The point of shipping and caching shapes: `rlhf budget` answers in a fraction of a second, without importing
    torch or transformers (seconds on a small machine)."""
    model = write_config(tmp_path / "tiny-llama")
    computed = model_shape(str(model))  # computed here, cached for the fresh process below
    code = f"""
import contextlib, io, json, sys
from rlhf.budget.shapes import model_shape
from rlhf.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    codes = [main(["budget", "--model", "gpt-neox-20b", "--gpu", "24GiB"]),
             main(["budget", "--model", {str(model)!r}, "--gpu", "24GiB", "--step", "sft"])]
params = model_shape({str(model)!r}).params
print(json.dumps({{"codes": codes, "params": params, "heavy": [m for m in sys.modules if m.split(".")[0] in {HEAVY}]}}))
"""
    result = run_python(code, private_cache)
    assert result == {"codes": [0, 0], "params": computed.params, "heavy": []}
