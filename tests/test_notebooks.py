"""The notebooks: committed clean, independent of the checkout's layout, and run top to bottom.

They run at tiny size (``LBSGD_NOTEBOOK_TINY=1`` shrinks their training runs; their own assertions still
check what each section claims) from a working directory outside the repository, with this checkout's
``lbsgd`` as the only package taken from it.
"""

import importlib.metadata
import importlib.util
import os
import pathlib
import subprocess
import sys

import nbformat
import pytest
from nbclient import NotebookClient

REPO = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
IDS = [p.name for p in NOTEBOOKS]
# What ties a notebook to the checkout's layout or working directory.
LAYOUT = ("sys.path", "from experiments", "import experiments", 'os.path.abspath("..")', "PYTHONPATH")


def _code(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_committed_clean(path):
    """No outputs, execution counts or execution timestamps (nothing that can go stale), no layout ties."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        for tie in LAYOUT:
            assert tie not in cell.source, f"{path.name} cell {i} contains {tie!r}"
        assert "execution" not in cell.metadata, f"{path.name} cell {i} keeps execution timestamps"
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name} cell {i} has outputs"
            assert cell.execution_count is None, f"{path.name} cell {i} has an execution count"


def _install_cell():
    """The first code cell, the same in every notebook."""
    sources = {_code(nbformat.read(p, as_version=4))[0].source for p in NOTEBOOKS}
    assert len(sources) == 1, "the notebooks' install cells differ"
    return sources.pop()


def _run_install_cell(monkeypatch, source_value, absent=()):
    """Run the install cell in this process with ``LBSGD_SOURCE`` set, the modules ``absent`` taken as not
    installed and pip replaced; return pip's calls."""
    lines = _install_cell().splitlines()
    assert lines[0].startswith('LBSGD_SOURCE = ""'), "LBSGD_SOURCE must be the install cell's first line"
    lines[0] = f"LBSGD_SOURCE = {source_value!r}"
    calls = []

    def check_call(cmd, *args, **kwargs):
        constraints = None
        if "-c" in cmd:  # the cell's constraints file: read, then removed
            pins = pathlib.Path(cmd[cmd.index("-c") + 1])
            constraints = pins.read_text()
            pins.unlink()
        calls.append((cmd, constraints))
        return 0

    monkeypatch.setattr(subprocess, "check_call", check_call)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in absent else real_find_spec(name, *a)
    )
    exec(compile("\n".join(lines), "install-cell", "exec"), {})  # noqa: S102 - the cell is what is tested
    return calls


def test_install_cell_does_nothing_where_lbsgd_is_importable(monkeypatch):
    assert _run_install_cell(monkeypatch, "") == []


def test_install_cell_asks_for_a_source(monkeypatch):
    with pytest.raises(RuntimeError, match=r"\(no lbsgd\): set LBSGD_SOURCE"):
        _run_install_cell(monkeypatch, "", absent={"lbsgd"})


@pytest.mark.parametrize("kind", ["git", "path", "extra"])
def test_install_cell_installs_train_extras_and_keeps_jax(monkeypatch, tmp_path, kind):
    """lbsgd[train] from a git URL or a local path; also where lbsgd is there without its [train] extra."""
    source = str(tmp_path) if kind == "path" else "git+https://github.com/someone/lbsgd.git@main"
    absent = {"clu"} if kind == "extra" else {"lbsgd"}
    [(cmd, constraints)] = _run_install_cell(monkeypatch, source, absent)
    want = tmp_path.resolve().as_uri() if kind == "path" else source
    assert cmd[:4] == [sys.executable, "-m", "pip", "install"] and cmd[-1] == f"lbsgd[train] @ {want}"
    # JAX as installed is pinned, so pip never replaces the runtime's (jax[tpu] on Colab TPU runtimes).
    pins = set(constraints.split())
    assert f"jax=={importlib.metadata.version('jax')}" in pins
    assert f"jaxlib=={importlib.metadata.version('jaxlib')}" in pins
    assert all(p.split("==")[0] in ("jax", "jaxlib") or p.startswith(("libtpu", "jax-cuda", "jax-rocm")) for p in pins)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_runs(path, data_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("LBSGD_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("TFDS_DATA_DIR", data_dir)
    # The kernel imports this checkout's lbsgd, installed or not, and nothing else of the checkout
    # (experiments/ is not importable): the only entry of its path from here is a link to lbsgd/.
    site = tmp_path / "site"
    site.mkdir()
    (site / "lbsgd").symlink_to(REPO / "lbsgd", target_is_directory=True)
    monkeypatch.setenv("PYTHONPATH", str(site))
    run_dir = tmp_path / "cwd"  # outside the repository: nothing may depend on the working directory
    run_dir.mkdir()
    monkeypatch.chdir(run_dir)
    nb = nbformat.read(path, as_version=4)
    nb.cells.append(
        nbformat.v4.new_code_cell(
            "import importlib.util, os, lbsgd\n"
            "print(os.getcwd(), lbsgd.__file__, importlib.util.find_spec('experiments') is None)"
        )
    )
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(run_dir)}}).execute()
    outputs = "".join(o.get("text", "") for c in _code(nb) for o in c.get("outputs", []))
    assert "test accuracy" in outputs
    assert f"{run_dir} {site / 'lbsgd' / '__init__.py'} True" in outputs
    assert os.listdir(run_dir) == [], "the notebook wrote into its working directory"
