"""Every notebook in notebooks/ runs headless, top to bottom, without error.

The notebooks state their claims as asserts, so a notebook whose claims stop
holding fails here. Each runs in a kernel on this interpreter (the venv's
python), through a kernelspec written to a temporary directory: no
kernelspec has to be installed by hand, and a system-wide "python3" kernel
(another interpreter, without jaxent) cannot be picked up by mistake.
"""
import json
import pathlib
import sys

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
KERNEL = "jaxent-test-python"


@pytest.fixture(scope="module")
def kernel_name(tmp_path_factory):
  root = tmp_path_factory.mktemp("jupyter")
  spec_dir = root / "kernels" / KERNEL
  spec_dir.mkdir(parents=True)
  (spec_dir / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "jaxent tests",
      "language": "python",
  }))
  with pytest.MonkeyPatch.context() as mp:
    # jupyter_client searches JUPYTER_PATH first for kernelspecs.
    mp.setenv("JUPYTER_PATH", str(root))
    yield KERNEL


def test_notebooks_exist():
  assert NOTEBOOKS, f"no notebooks in {NOTEBOOK_DIR}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, kernel_name):
  nb = nbformat.read(path, as_version=4)
  # Committed without outputs, so that diffs show code, not images.
  assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), (
      f"{path.name} has outputs; clear them before committing")
  client = NotebookClient(nb, timeout=300, kernel_name=kernel_name,
                          resources={"metadata": {"path": str(path.parent)}})
  client.execute()  # raises CellExecutionError, with the cell's traceback
