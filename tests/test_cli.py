"""The command line: help for every command, one-line errors with exit 2, nothing written on bad input."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import cli

COMMANDS = {
    "sft": ["--recipe", "--model", "--dataset", "--run", "--gpu", "--resume", "--force", "--auto-fit"],
    "merge": ["--run", "--dtype", "--adapters", "--weights", "--method", "--force"],
    "reward": ["--recipe", "--dataset", "--run", "--gpu", "--resume", "--force"],
    "ppo": ["--recipe", "--reward", "--run", "--gpu", "--resume", "--force", "--auto-fit"],
    "grpo": ["--recipe", "--reward", "--run", "--gpu", "--resume", "--force", "--auto-fit", "group_size", "rloo"],
    "budget": ["--recipe", "--model", "--step", "--gpu", "--json"],
    "preview": ["--recipe", "-n"],
    "quickstart": ["--run", "--algo", "grpo", "--reward-model", "--task", "arithmetic"],
    "report": ["--run"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_documents_every_flag(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli(command, "--help")
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in COMMANDS[command]:
        assert flag in out


def test_python_dash_m_entry_point():
    done = subprocess.run([sys.executable, "-m", "rlhf", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "quickstart" in done.stdout


@pytest.mark.parametrize(
    "override, names",
    [("lora.rnak=8", ["lora.rnak", "rank"]), ("lora.rank=abc", ["lora.rank", "abc"])],
)
def test_bad_override_is_one_line_exit_2(tmp_path, capsys, override, names):
    run = tmp_path / "R"
    assert cli("sft", "--recipe", "quickstart", "--run", run, override) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rlhf: error:")
    for name in names:
        assert name in err[0]
    assert "Traceback" not in err[0]
    assert not run.exists(), "a rejected command writes nothing"


def test_unknown_flag_is_one_line(capsys):
    assert cli("sft", "--recipes", "quickstart") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--recipes" in err[0]


def test_debug_shows_traceback(tmp_path, capsys):
    assert cli("--debug", "sft", "--recipe", "quickstart", "--run", tmp_path / "R", "lora.rnak=8") == 2
    assert "Traceback" in capsys.readouterr().err


def test_unknown_model_alias_or_missing_dir(tmp_path, capsys):
    assert cli("sft", "--model", str(tmp_path / "nope"), "--run", tmp_path / "R") == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and len(err.strip().splitlines()) == 1


def test_preview_shows_decoded_tokens(capsys, fixture_paths):
    assert cli("preview", "--recipe", "quickstart", "-n", "2") == 0
    out = capsys.readouterr().out
    assert "example 0" in out and "example 1" in out and "example 2" not in out
    assert "in loss" in out and "(EOS)" in out
    assert "checks:" in out or "warning:" in out


def test_preview_warns_on_truncation(capsys, fixture_paths):
    assert cli("preview", "--recipe", "quickstart", "-n", "1", "sft.pack=false", "sft.block_size=16") == 0
    assert "longer than sft.block_size=16" in capsys.readouterr().out
