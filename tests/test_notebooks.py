"""Notebooks run top to bottom (at tiny size) with the installed lbsgd."""

import os
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, data_dir, monkeypatch):
    monkeypatch.setenv("LBSGD_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("TFDS_DATA_DIR", data_dir)
    repo = str(path.parent.parent)  # the kernel imports this checkout's lbsgd, installed or not
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])))
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "test accuracy" in outputs
