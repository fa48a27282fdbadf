"""Shared test setup: offline, a private fixture cache and runs root, and one quickstart run shared by the tests.

The tiny fixtures (corpus, tokenizer, GPT-NeoX, DistilBERT) are built once per session into $RLHF_CACHE (a temporary
directory unless the caller sets one, as CI does); the session runs `rlhf sft` and `rlhf merge` once, and tests that
need a trained adapter or a merged model copy those runs instead of training again.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

# No hub at test time: the network boundary is closed, so a test that reached for it would fail, not hang.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("RLHF_CACHE", tempfile.mkdtemp(prefix="rlhf-cache-"))
os.environ["RLHF_RUNS"] = tempfile.mkdtemp(prefix="rlhf-runs-")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# OpenMP threads that busy-wait make torch 6-8x slower on a CPU shared with other processes (subprocess tests).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def pytest_addoption(parser):
    parser.addoption(
        "--cuda-rules",
        action="store_true",
        help="run every test under rlhf.testing.cuda_rules: raise where CUDA would refuse what the CPU runs",
    )


@pytest.fixture(scope="session", autouse=True)
def cuda_rules_everywhere(request):
    """With --cuda-rules, the whole session (shared runs included) under CUDA's dtype rules."""
    if not request.config.getoption("--cuda-rules"):
        yield
        return
    from rlhf.testing.cuda_rules import cuda_rules

    with cuda_rules():
        yield


def cli(*args: str) -> int:
    """Run `rlhf ARGS` in this process (no interpreter start-up, no torch re-import) and return its exit code."""
    from rlhf.cli import main

    return main([str(a) for a in args])


@pytest.fixture(scope="session")
def fixture_paths():
    from rlhf.fixtures import ensure_fixtures

    return ensure_fixtures(progress=False)


@pytest.fixture(scope="session")
def sft_run(tmp_path_factory, fixture_paths) -> Path:
    """A short quickstart SFT run (the real 8-bit path), shared read-only by the tests."""
    run = tmp_path_factory.mktemp("shared") / "sft"
    assert cli("sft", "--recipe", "quickstart", "--run", run, "sft.max_steps=12", "sft.logging_steps=2") == 0
    return run


@pytest.fixture(scope="session")
def merged_run(tmp_path_factory, sft_run) -> Path:
    run = tmp_path_factory.mktemp("shared") / "merged"
    shutil.copytree(sft_run, run)
    assert cli("merge", "--run", run) == 0
    return run


@pytest.fixture
def copy_run(tmp_path):
    """A private, writable copy of a shared run."""

    def _copy(run: Path, name: str = "run") -> Path:
        dst = tmp_path / name
        shutil.copytree(run, dst, ignore=shutil.ignore_patterns("checkpoints"))
        return dst

    return _copy


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory, fixture_paths) -> Path:
    """One full `rlhf quickstart` run (sft, merge, ppo, eval, report), shared by the end-to-end tests."""
    run = tmp_path_factory.mktemp("shared") / "quickstart"
    assert cli("quickstart", "--run", run) == 0
    return run


@pytest.fixture(scope="session")
def arithmetic_run(tmp_path_factory, fixture_paths) -> Path:
    """One `rlhf quickstart --task arithmetic` run (sft on pairs, merge, grpo, eval, report), shared by its tests."""
    run = tmp_path_factory.mktemp("shared") / "arithmetic"
    assert cli("quickstart", "--task", "arithmetic", "--run", run) == 0
    return run
