"""Execute the tiny-model notebooks end to end with nbclient.

``01_quickstart`` and ``03_patching_with_privacy_neurons`` run on the tiny model as stored.
``02_smollm2_privacy_neurons`` is left out: it fine-tunes and localizes on SmolLM2-135M,
which takes far longer than a test may.

The kernel runs this test's own interpreter (``sys.executable``) through a kernelspec written
to a temporary folder, so a ``python3`` kernelspec elsewhere on the machine cannot select
another environment. Its cache (``TL_PRIVACY_CACHE``) is a temporary folder too.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
KERNEL_NAME = "tl-privacy-test"

# Seconds one cell may run. The slowest cells (memorize, localize, the patching sweeps) take
# well under a minute each on one CPU thread; the margin covers a loaded CI machine.
CELL_TIMEOUT_S = 600


@pytest.fixture
def kernel_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Write a kernelspec for ``sys.executable`` and point Jupyter and the cache at tmp_path."""
    spec_folder = tmp_path / "jupyter" / "kernels" / KERNEL_NAME
    spec_folder.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "tl-privacy test kernel",
        "language": "python",
    }
    (spec_folder / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("TL_PRIVACY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    work = tmp_path / "work"
    work.mkdir()
    return work


def execute(name: str, workdir: Path) -> tuple[nbformat.NotebookNode, float]:
    """Run notebook ``name`` in ``workdir``; return the executed notebook and its wall time."""
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    # The first cell fails the run if the kernel is not this interpreter.
    check = nbformat.v4.new_code_cell(
        f"import sys\nassert sys.executable == {sys.executable!r}, sys.executable"
    )
    notebook.cells.insert(0, check)
    client = NotebookClient(
        notebook,
        kernel_name=KERNEL_NAME,
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(workdir)}},
    )
    started = time.perf_counter()
    try:
        client.execute()
    except CellExecutionError as error:
        pytest.fail(f"{name} failed:\n{error}")
    return notebook, time.perf_counter() - started


def errors_in(notebook: nbformat.NotebookNode) -> list[str]:
    """Return the error outputs of every code cell."""
    return [
        f"{output.get('ename')}: {output.get('evalue')}"
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if output.get("output_type") == "error"
    ]


@pytest.mark.parametrize("name", ["01_quickstart.ipynb", "03_patching_with_privacy_neurons.ipynb"])
def test_notebook_runs(name: str, kernel_env: Path) -> None:
    notebook, seconds = execute(name, kernel_env)
    print(f"{name}: {seconds:.0f} s")

    assert errors_in(notebook) == []
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.get("execution_count") for cell in code_cells)


@pytest.mark.parametrize(
    "name",
    [
        "01_quickstart.ipynb",
        "02_smollm2_privacy_neurons.ipynb",
        "03_patching_with_privacy_neurons.ipynb",
    ],
)
def test_notebook_stored_without_outputs(name: str) -> None:
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(notebook)

    assert notebook.nbformat == 4
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        assert cell.outputs == [], f"a cell of {name} has stored outputs"
        assert cell.execution_count is None, f"a cell of {name} has an execution count"
