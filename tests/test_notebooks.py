"""The notebooks run top to bottom, as committed, against the quickstart recipe and a finished quickstart run.

Each runs in a fresh `python3` kernel (this interpreter, so it imports this rlhf) with a temporary working directory;
the environment (offline hub, the fixture cache, RLHF_NOTEBOOK_RUN) is inherited by the kernel.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
CELL_TIMEOUT_S = 300


def _runs_this_interpreter(argv0: str) -> bool:
    # jupyter_client swaps a bare "python"/"python3"/"python3.X" for sys.executable; an absolute path must be ours.
    bare = {"python", f"python{sys.version_info[0]}", "python{}.{}".format(*sys.version_info[:2])}
    return argv0 in bare or os.path.realpath(argv0) == os.path.realpath(sys.executable)


@pytest.fixture(scope="session")
def python3_kernel(tmp_path_factory):
    """The kernel name to run: `python3`, installed into a private prefix if missing or bound to another Python."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        usable = _runs_this_interpreter(KernelSpecManager().get_kernel_spec("python3").argv[0])
    except NoSuchKernel:
        usable = False
    if usable:
        yield "python3"
        return
    from ipykernel.kernelspec import install

    prefix = tmp_path_factory.mktemp("jupyter")
    install(kernel_name="python3", prefix=str(prefix))  # argv = [sys.executable, -m, ipykernel_launcher, ...]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(
            "JUPYTER_PATH",
            os.pathsep.join(filter(None, [str(prefix / "share" / "jupyter"), os.environ.get("JUPYTER_PATH")])),
        )
        yield "python3"


def execute(name: str, cwd: Path, kernel: str) -> str:
    """Run a notebook as committed; return all its text output (a failing cell raises CellExecutionError)."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name=kernel, resources={"metadata": {"path": str(cwd)}}).execute()
    return "\n".join(out.get("text", "") for cell in nb.cells for out in cell.get("outputs", []))


@pytest.mark.parametrize("name", ["01-check-tokenization.ipynb", "02-inspect-a-run.ipynb"])
def test_notebooks_are_committed_without_outputs(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


def test_check_tokenization_notebook(python3_kernel, fixture_paths, tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_NOTEBOOK_RECIPE", "quickstart")
    text = execute("01-check-tokenization.ipynb", tmp_path, python3_kernel)
    assert "recipe   quickstart" in text
    assert "count in the loss" in text
    assert "re-tokenize to the same ids" in text
    assert "jointly decoded text" in text


def test_inspect_a_run_notebook(python3_kernel, quickstart_run, tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_NOTEBOOK_RUN", str(quickstart_run))
    text = execute("02-inspect-a-run.ipynb", tmp_path, python3_kernel)
    assert f"run    {Path(quickstart_run).resolve()}" in text
    assert "summary.weight" in text  # the value head read with safetensors
    assert text.count("  SFT      ") == text.count("  PPO      ") >= 1  # with and without the adapter
    assert "PPO rewards:" in text
