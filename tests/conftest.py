"""Test-wide setup.

Multi-device code is tested on a CPU mesh of 8 devices. XLA reads the flag
once, when jax is first imported, so it is set here, before any test module
imports jax.
"""
import os

_FLAG = "--xla_force_host_platform_device_count=8"
# The suite compiles hundreds of small programs and runs each a few times:
# LLVM at optimisation level 0 compiles them about a third faster (measured
# on tests/test_train_step.py: 2m21s -> 1m33s CPU), and nothing here is timed.
_OPT = "--xla_backend_optimization_level="
for flag in (_FLAG, _OPT + "0"):
  if flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Tests (and the CLI subprocesses they start, which inherit the environment)
# compile many of the same programs; a persistent compilation cache shared by
# the session turns the repeats into cache hits.
import tempfile  # noqa: E402

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"jaxent-test-xla-cache-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
