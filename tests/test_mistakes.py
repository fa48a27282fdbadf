"""Mistakes a new user makes, each answered by one line they can act on (exit 2, nothing written), and what a normal
SFT run shows: rlhf's own lines and one progress bar, no library chatter."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess

import pytest
from conftest import cli

from rlhf.config import DataConfig, load_recipe
from rlhf.data import load_texts
from rlhf.errors import explain
from rlhf.runs import Run


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def _tree(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def read_only(tmp_path):
    """A run directory nothing can be written in: chmod for a user, the immutable flag for root (chmod does not stop
    root); skipped where neither does."""
    root = tmp_path / "ro"
    Run(root).write_recipe(load_recipe("quickstart"))
    root.chmod(stat.S_IRUSR | stat.S_IXUSR)
    immutable = os.geteuid() == 0 and shutil.which("chattr")
    if immutable:
        subprocess.run(["chattr", "+i", str(root)], check=False, capture_output=True)
    try:
        (root / "probe").write_text("x")
    except OSError:
        yield root
    else:
        (root / "probe").unlink()
        pytest.skip("cannot make a read-only folder here")
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(root)], check=False, capture_output=True)
        root.chmod(stat.S_IRWXU)


def test_a_read_only_run_directory_is_one_line_naming_it(read_only, capsys):
    before = _tree(read_only)
    for args in (["report"], ["ppo", "--reward", "quickstart-sentiment"], ["merge"]):
        assert cli(*args, "--run", read_only) == 2, args
        line = _one_line(capsys)
        assert f"cannot write in {read_only}" in line and "bug" not in line, line
    assert cli("sft", "--recipe", "quickstart", "--run", read_only / "new") == 2
    assert f"cannot write in {read_only}" in _one_line(capsys)
    assert _tree(read_only) == before


def test_an_empty_data_file_and_a_column_of_numbers(tmp_path, capsys, fixture_paths):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert cli("sft", "--recipe", "quickstart", "--dataset", empty, "--run", tmp_path / "run") == 2
    assert f"{empty} is empty (data.dataset)" in _one_line(capsys)
    assert not (tmp_path / "run").exists()

    numbers = tmp_path / "scores.jsonl"
    numbers.write_text("".join(json.dumps({"review": f"text {i}", "score": i}) + "\n" for i in range(3)))
    with pytest.raises(Exception, match=r"column 'score' holds int values, not text; .*\(text columns: review\)"):
        load_texts(DataConfig(dataset=str(numbers), text_column="score"), "train")


def test_documents_too_short_to_be_prompts_are_counted(tmp_path, capsys):
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("short", "x" * 250, "tiny", "y" * 300)))
    texts = load_texts(DataConfig(dataset=str(data)), "train", min_chars=200, setting="ppo.prompt_min_chars")
    assert len(texts) == 2
    err = capsys.readouterr().err
    assert "ppo: 2 of 4 'train' documents have 200 characters or fewer and are left out (ppo.prompt_min_chars=200)" in (
        err
    )


def test_a_setting_without_its_section_suggests_the_section(capsys):
    assert cli("sft", "--recipe", "quickstart", "max_steps=5") == 2
    assert "unknown key 'max_steps' (did you mean sft.max_steps, ppo.max_steps" in _one_line(capsys)
    assert cli("budget", "--recipe", "quickstart", "lora.rnak=4") == 2
    assert "unknown key 'lora.rnak' (did you mean 'lora.rank'?)" in _one_line(capsys)


def test_sft_shows_one_bar_and_only_rlhfs_lines(tmp_path, capsys, fixture_paths):
    # A learning rate far too high: the loss climbs above ln(vocabulary) and the hint says what to check.
    args = ["--recipe", "quickstart", "--run", tmp_path / "run", "sft.max_steps=6", "sft.logging_steps=2"]
    assert cli("sft", *args, "sft.learning_rate=5") == 0
    err = capsys.readouterr().err
    lines = [line.strip() for line in err.replace("\r", "\n").splitlines() if line.strip()]
    assert all(line.startswith("sft:") for line in lines), [x for x in lines if not x.startswith("sft:")]
    assert "{'loss'" not in err and "train_runtime" not in err
    bar = lines[-1]
    assert "6/6" in bar and "loss=" in bar and "tok/s=" in bar, bar
    assert any("sft: warning: SFT loss" in line and "above ln(vocabulary) = 7.62" in line for line in lines), lines

    assert cli("merge", "--run", tmp_path / "run") == 0
    err = capsys.readouterr().err
    lines = [line.strip() for line in err.replace("\r", "\n").splitlines() if line.strip()]
    assert lines and all(line.startswith("merge: shard 1/1") for line in lines), lines  # a labelled bar, nothing else


@pytest.mark.parametrize(
    "code, expected",
    [(errno.ENOSPC, "disk full while writing in {folder}; free space there"),
     (errno.EROFS, "cannot write in {folder} (Read-only file system); make it writable"),
     (errno.EACCES, "cannot write in {folder} (Permission denied); make it writable")],
    ids=["full", "read-only-mount", "permission"],
)  # fmt: skip
def test_a_failed_write_names_the_folder_not_a_bug(tmp_path, code, expected):
    # What an atomic write raises when the run directory fills up or turns read-only mid-run: its temp file's name.
    exc = OSError(code, os.strerror(code), str(tmp_path / "ppo" / ".eval.json.abc123.tmp"))
    line, exit_code = explain(exc)
    assert exit_code == 2 and line.startswith(expected.format(folder=tmp_path / "ppo")), line
