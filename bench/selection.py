"""Covariance selection at 1M tokens: one device vs an 8-device CPU mesh.

Times ``ops.top_k_mask`` (the selection behind Clip-Cov and KL-Cov) on a
[256, 4096] token array:
  * single   -- one device, no mesh (the baseline, measured in this process);
  * mesh     -- 8-device CPU mesh (8,1,1), inputs sharded over the batch
                axes: the two-stage shard_map top-k;
  * naive    -- the same mesh, but the one-stage top-k of the flat array left
                to GSPMD (what you get without the two-stage path).
and reports each program's largest gathering collective (elements) against
the token count, read from the compiled HLO.

The 8 "devices" share this machine's CPU cores, so the mesh timing measures
the algorithm's work, not a real multi-chip speed-up.

    .venv/bin/python bench/selection.py [--batch 256 --time 4096 --ratio 2e-3]
"""
import os

# XLA reads the device count once, at import.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import functools  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from jaxent import ops  # noqa: E402
from jaxent.ops import _select  # noqa: E402
from jaxent.sharding import collective_sizes, make_mesh  # noqa: E402


def timeit(f, *args, reps):
  jax.block_until_ready(f(*args))  # compile + warm up
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    ts.append(time.perf_counter() - t0)
  return float(np.median(ts))


def largest_collective(f, *args):
  sizes = collective_sizes(f.lower(*args).compile().as_text())
  return max((n for _, n in sizes), default=0)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--batch", type=int, default=256)
  ap.add_argument("--time", type=int, default=4096)
  ap.add_argument("--ratio", type=float, default=2e-3)  # paper's KL-Cov ratio for 7B
  ap.add_argument("--reps", type=int, default=10)
  args = ap.parse_args()

  b, t = args.batch, args.time
  n = b * t
  k_max = ops.static_count_bound(args.ratio, n)
  rng = np.random.default_rng(0)
  scores = rng.normal(size=(b, t)).astype(np.float32)
  lens = rng.integers(t // 4, t + 1, b)  # ragged right-padded responses
  valid = np.arange(t)[None, :] < lens[:, None]
  count = ops.selection_count(args.ratio, int(valid.sum()))

  single = jax.jit(functools.partial(ops.top_k_mask, k_max=k_max))
  t_single = timeit(single, scores, valid, count, reps=args.reps)
  ref = np.asarray(single(scores, valid, count))

  mesh = make_mesh(8, 1, 1)
  sh = NamedSharding(mesh, P(("data", "fsdp")))
  s_d, v_d = jax.device_put(scores, sh), jax.device_put(valid, sh)
  with jax.set_mesh(mesh):
    sharded = jax.jit(functools.partial(ops.top_k_mask, k_max=k_max))
    t_mesh = timeit(sharded, s_d, v_d, count, reps=args.reps)
    out = np.asarray(sharded(s_d, v_d, count))
    c_mesh = largest_collective(sharded, s_d, v_d, count)
    naive = jax.jit(lambda s, v, c: _select._top_k_mask_local(s, v, c, k_max))
    t_naive = timeit(naive, s_d, v_d, count, reps=args.reps)
    c_naive = largest_collective(naive, s_d, v_d, count)
  assert np.array_equal(out, ref), "sharded selection differs from single-device"

  print(f"tokens {b}x{t} = {n}, ratio {args.ratio:g}, k_max {k_max}, count {int(count)}, "
        f"jax {jax.__version__}, {os.cpu_count()} CPU cores")
  print(f"single device        {t_single * 1e3:8.2f} ms   (1.00x)")
  print(f"8-dev mesh two-stage {t_mesh * 1e3:8.2f} ms   ({t_mesh / t_single:.2f}x single)   "
        f"largest collective {c_mesh} elements = {c_mesh / n:.4f} of tokens "
        f"(8 x k_max = {8 * k_max}); selection identical to single device")
  print(f"8-dev mesh naive     {t_naive * 1e3:8.2f} ms   ({t_naive / t_single:.2f}x single)   "
        f"largest collective {c_naive} elements = {c_naive / n:.4f} of tokens")


if __name__ == "__main__":
  main()
