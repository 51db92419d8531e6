"""Every notebook in notebooks/ runs top to bottom in a fresh kernel within its time bound, and the
committed copy carries the outputs of a real run (so it reads on GitHub)."""

from __future__ import annotations

import glob
import os
import time

import pytest

from tests.helpers import ROOT

NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))
# Seconds a notebook may take here (2 CPU cores, XLA at the tests' optimization level).
# quickstart prepares the built-in corpus on a clean machine (~10 s); routing reuses it.
# finetune trains the small base generate reuses (notebooks/tiny_base.py, cached), which comes
# first in this sorted order; run alone, generate trains it too (~1 minute more).
BOUND_S = {
    "quickstart": 180,
    "routing": 150,
    "scaling": 120,
    "huggingface": 120,
    "finetune": 240,
    "generate": 180,
}


def test_the_notebooks_exist():
    names = {os.path.splitext(os.path.basename(p))[0] for p in NOTEBOOKS}
    want = {"quickstart", "routing", "scaling", "huggingface", "generate", "finetune"}
    assert want <= names, names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: os.path.basename(p))
def test_committed_notebook_has_outputs_and_no_errors(path):
    import nbformat

    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.execution_count for c in code), "commit the executed notebook"
    for c in code:
        assert not [o for o in c.outputs if o.output_type == "error"], c.source[:200]
    assert any("image/png" in o.get("data", {}) for c in code for o in c.outputs), (
        "each notebook shows at least one plot"
    )


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: os.path.basename(p))
def test_notebook_runs_top_to_bottom(path):
    import nbformat
    from nbclient import NotebookClient

    name = os.path.splitext(os.path.basename(path))[0]
    bound = BOUND_S.get(name, 120)
    nb = nbformat.read(path, as_version=4)
    # The notebooks train for a few hundred steps: XLA's optimizations pay for themselves there, so
    # the kernel runs without the tests' --xla_backend_optimization_level=0 (conftest).
    flags = os.environ.get("XLA_FLAGS", "").replace("--xla_backend_optimization_level=0", "")
    env = dict(os.environ, XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu")
    t = time.time()
    # A failing cell raises CellExecutionError naming the cell and its traceback.
    NotebookClient(
        nb,
        timeout=bound,
        kernel_name="python3",
        resources={"metadata": {"path": os.path.dirname(path)}},
    ).execute(env=env)
    took = time.time() - t
    assert took < bound, f"{name} took {took:.0f} s (bound {bound} s)"
    # a plot shown on this run too (nothing the notebook calls may switch matplotlib's backend)
    assert any("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", [])), (
        f"{name} showed no plot when executed"
    )
