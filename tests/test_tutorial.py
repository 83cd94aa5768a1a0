"""docs/tutorial.ipynb runs from top to bottom, and its committed outputs are a real run.

The notebook executes in a fresh kernel that runs this interpreter (``sys.executable``): the
test writes its own kernelspec into a temporary folder that it puts first on ``JUPYTER_PATH``,
so a ``python3`` kernelspec elsewhere on the machine (a user's, pointing at another Python)
cannot be picked instead of the venv's.

After editing the notebook, refresh its committed outputs with the same kernel:
``LSTMKIT_UPDATE_TUTORIAL=1 .venv/bin/pytest -q tests/test_tutorial.py``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import nbclient
import nbformat
import pytest
from ipykernel import kernelspec

NOTEBOOK = Path(__file__).resolve().parents[1] / "docs" / "tutorial.ipynb"
KERNEL = "lstmkit-tutorial"
TIMEOUT_S = 120  # per cell; the whole notebook runs in about 20 s on two cores
MAX_BYTES = 1_500_000


def _kind(output) -> str:
    """``stream:stdout``, ``display_data:image/png,text/plain``, ``error:NameError``..."""
    detail = output.get("name") or ",".join(sorted(output.get("data", ()))) or output.get("ename")
    return f"{output['output_type']}:{detail}"


def _outputs(notebook) -> list[list[str]]:
    """What each code cell shows, as the kinds of its outputs."""
    return [
        [_kind(output) for output in cell.outputs]
        for cell in notebook.cells
        if cell.cell_type == "code"
    ]


@pytest.fixture
def kernel_name(tmp_path, monkeypatch) -> str:
    """A kernelspec whose argv starts with this interpreter, first on the kernel search path."""
    kernelspec.install(kernel_name=KERNEL, prefix=str(tmp_path))
    spec = tmp_path / "share" / "jupyter" / "kernels" / KERNEL / "kernel.json"
    assert json.loads(spec.read_text())["argv"][0] == sys.executable
    monkeypatch.setenv("JUPYTER_PATH", str(spec.parents[2]))
    return KERNEL


def test_committed_notebook_holds_the_outputs_of_one_run_in_order():
    committed = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in committed.cells if cell.cell_type == "code"]
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1))
    kinds = [kind for cell in _outputs(committed) for kind in cell]
    assert not [kind for kind in kinds if kind.startswith("error")]
    assert sum("image/png" in kind for kind in kinds) >= 5  # the figures are embedded
    assert NOTEBOOK.stat().st_size < MAX_BYTES


def test_notebook_runs_top_to_bottom(kernel_name):
    committed = nbformat.read(NOTEBOOK, as_version=4)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        kernel_name=kernel_name,
        timeout=TIMEOUT_S,  # per cell: a cell that hangs fails instead of stalling CI
        record_timing=False,  # no timestamps in the committed file
        coalesce_streams=True,  # one stdout output per cell, however the kernel flushed it
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    client.execute()  # raises CellExecutionError, with the cell and its traceback, on an error
    # the notebook's own kernelspec stays the portable "python3", not this test's name
    notebook.metadata["kernelspec"] = committed.metadata["kernelspec"]
    if os.environ.get("LSTMKIT_UPDATE_TUTORIAL") == "1":
        nbformat.write(notebook, NOTEBOOK)
        committed = notebook
    # a cell added or changed without re-running the notebook shows different kinds of output
    assert _outputs(notebook) == _outputs(committed)
