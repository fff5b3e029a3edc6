"""The notebooks run top to bottom on a fresh kernel of this very interpreter."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
KERNEL = "rollout-tests"


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A kernelspec for sys.executable, so a user-level `python3` kernel pointing at another
    Python can't shadow the project's environment."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    kernel = {"argv": argv, "display_name": "rollout tests", "language": "python"}
    (spec / "kernel.json").write_text(json.dumps(kernel))
    return root


@pytest.mark.parametrize(
    "name",
    ["surge_vs_unavailable.ipynb", "capacity_planning.ipynb", "blast_radius.ipynb"],
    ids=lambda n: n[:-6],
)
def test_notebook_runs_top_to_bottom(
    name: str, kernel_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JUPYTER_PATH", str(kernel_dir))
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(
        nb, kernel_name=KERNEL, timeout=180, resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    client.execute()  # raises CellExecutionError, naming the cell, on any error
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.execution_count for c in code)
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors
    images = sum("image/png" in o.get("data", {}) for c in code for o in c.outputs)
    assert images >= 3  # the figures were drawn inline, not swallowed by a file backend


@pytest.mark.parametrize(
    "name", ["surge_vs_unavailable.ipynb", "capacity_planning.ipynb"], ids=lambda n: n[:-6]
)
def test_notebook_is_committed_executed(name: str) -> None:
    """A reader who opens the notebook sees its tables and figures without running it."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code)
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))  # top to bottom
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for c in code for o in c.outputs) >= 3
