"""Secrets and code execution: a hub token never reaches the run directory or the logs; remote code runs only when
the recipe turns it on; nothing is unpickled."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import cli

import rlhf

TOKEN = "hf_rlhfTestTokenDoNotWrite0123456789abcdef"
PACKAGE = Path(rlhf.__file__).resolve().parent
SOURCES = sorted(PACKAGE.rglob("*.py"))


@pytest.fixture
def remote_code_calls(monkeypatch):
    """Every from_pretrained of the Auto classes, with the trust_remote_code it was called with."""
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    calls: list[tuple[str, bool]] = []
    for cls in (AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer):
        original = cls.from_pretrained.__func__

        def spy(klass, *args, _original=original, **kwargs):
            calls.append((klass.__name__, kwargs.get("trust_remote_code", False)))
            return _original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    return calls


def test_hub_token_is_never_written(tmp_path, monkeypatch, capsys, fixture_paths, remote_code_calls):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", TOKEN)
    run = tmp_path / "run"
    assert (
        cli("sft", "--recipe", "quickstart", "--run", run, "sft.max_steps=2", "sft.logging_steps=1", "sft.save_steps=1")
        == 0
    )
    assert cli("merge", "--run", run) == 0
    assert (
        cli(
            "ppo",
            "--run",
            run,
            "ppo.batch_size=8",
            "ppo.mini_batch_size=4",
            "ppo.rollout_batch_size=8",
            "ppo.ppo_epochs=1",
            "ppo.eval_prompts=4",
            "ppo.max_steps=1",
        )
        == 0
    )
    assert cli("report", "--run", run) == 0
    out, err = capsys.readouterr()
    assert TOKEN not in out and TOKEN not in err

    files = [p for p in run.rglob("*") if p.is_file()]
    # Everything a run holds, checkpoints (training_args.bin, optimizer state) and tensorboard events included.
    for expected in ("recipe.yaml", "sft/metrics.jsonl", "merged/README.md", "ppo/metrics.jsonl", "report.md"):
        assert run / expected in files
    assert any("checkpoint" in str(p) for p in files) and any("tfevents" in p.name for p in files)
    leaked = [str(p.relative_to(run)) for p in files if TOKEN.encode() in p.read_bytes()]
    assert not leaked, f"the hub token was written to {leaked}"

    # All the way through, no model, tokenizer or config was loaded with remote code allowed.
    assert remote_code_calls and not any(trusted for _, trusted in remote_code_calls)


def test_remote_code_only_when_the_recipe_turns_it_on(capsys, fixture_paths, remote_code_calls):
    assert cli("preview", "--recipe", "quickstart", "-n", "1", "model.trust_remote_code=true") == 0
    assert ("AutoTokenizer", True) in remote_code_calls


def _calls(tree: ast.AST):
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call)]


def _name(call: ast.Call) -> str:
    return ast.unparse(call.func)


def test_trust_remote_code_is_never_hard_coded():
    for path in SOURCES:
        tree = ast.parse(path.read_text())
        for call in _calls(tree):
            for kw in call.keywords:
                if kw.arg == "trust_remote_code":
                    assert not (isinstance(kw.value, ast.Constant) and kw.value.value), f"{path}:{call.lineno}"
        for node in ast.walk(tree):
            if isinstance(node, ast.arguments):
                named = node.posonlyargs + node.args
                with_default = [a.arg for a in named][len(named) - len(node.defaults) :]
                defaults = dict(zip(with_default, node.defaults, strict=True))
                defaults.update({a.arg: d for a, d in zip(node.kwonlyargs, node.kw_defaults, strict=True) if d})
                if "trust_remote_code" in defaults:
                    default = defaults["trust_remote_code"]
                    assert isinstance(default, ast.Constant) and default.value is False, f"{path}:{default.lineno}"

    from rlhf.config import ModelConfig
    from rlhf.rewards import RewardSpec

    assert ModelConfig().trust_remote_code is False
    assert RewardSpec(name="x", model="m").trust_remote_code is False


def test_nothing_is_unpickled():
    for path in SOURCES:
        text = path.read_text()
        tree = ast.parse(text)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                modules = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                assert not any(m and m.split(".")[0] in ("pickle", "dill", "cloudpickle", "joblib") for m in modules), (
                    f"{path}:{node.lineno}"
                )
        for call in _calls(tree):
            name = _name(call)
            if name.endswith("torch.load") or (name == "load" and "from torch import load" in text):
                weights_only = [kw for kw in call.keywords if kw.arg == "weights_only"]
                assert (
                    weights_only
                    and isinstance(weights_only[0].value, ast.Constant)
                    and weights_only[0].value.value is True
                ), f"{path}:{call.lineno}: torch.load without weights_only=True"
            assert not any(kw.arg == "allow_pickle" for kw in call.keywords), f"{path}:{call.lineno}"
            if name.endswith("from_pretrained") and "Model" in name:
                assert not any(
                    kw.arg == "use_safetensors" and isinstance(kw.value, ast.Constant) and kw.value.value is False
                    for kw in call.keywords
                ), f"{path}:{call.lineno}"
