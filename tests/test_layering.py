"""The layering of docs/ARCHITECTURE.md is a contract: import-linter fails on a forbidden import.

``make test`` runs ``lint-imports`` on the package itself; these tests show
that the contracts hold for the tree as it is and break, naming the import,
when one forbidden import is added to a copy of it (a downward-only layer
crossed upward, the functional core importing the trainer, a package
reaching into another's private module).
"""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINT = os.path.join(os.path.dirname(sys.executable), "lint-imports")


def _lint(root: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=root)
  return subprocess.run([LINT, "--no-cache", "--config", os.path.join(root, "pyproject.toml")],
                        cwd=root, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def tree(tmp_path):
  """A copy of the package and its contracts to break."""
  shutil.copytree(os.path.join(ROOT, "jaxent"), tmp_path / "jaxent",
                  ignore=shutil.ignore_patterns("__pycache__"))
  shutil.copy(os.path.join(ROOT, "pyproject.toml"), tmp_path / "pyproject.toml")
  return tmp_path


def test_the_package_keeps_every_contract(tree):
  out = _lint(str(tree))
  assert out.returncode == 0, out.stdout + out.stderr
  assert "0 broken" in out.stdout


@pytest.mark.parametrize("module,line,contract,named", [
    # the sampler (layer 4) importing the trainer (layer 6)
    ("sampler/_sampling.py", "import jaxent.train", "Layers", "jaxent.sampler._sampling -> jaxent.train"),
    # the functional core importing host code
    ("losses/_regularizers.py", "import jaxent.rewards", "functional core",
     "jaxent.losses._regularizers -> jaxent.rewards"),
    # a package reaching into another's private module
    ("rollout/_rollout.py", "from jaxent.sampler import _sampler", "private module",
     "jaxent.rollout._rollout -> jaxent.sampler._sampler"),
])
def test_a_forbidden_import_breaks_its_contract(tree, module, line, contract, named):
  path = tree / "jaxent" / module
  path.write_text(path.read_text() + f"\n{line}  # added by the test\n")
  out = _lint(str(tree))
  assert out.returncode != 0
  broken = out.stdout.split("Broken contracts")[-1]
  assert contract in broken and named in broken, out.stdout
