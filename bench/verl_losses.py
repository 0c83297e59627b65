"""Benchmark and peer check: jaxent's policy losses against verl 0.9.1's PyTorch ones.

Run (one process holds both sides; verl is a benchmark dependency, never a
runtime one)::

    python3 -m venv /work/venvs/verl
    /work/venvs/verl/bin/pip install torch==2.13.0          # the CPU build
    /work/venvs/verl/bin/pip install --no-deps verl==0.9.1 ray msgpack protobuf requests \\
        urllib3 jsonschema jsonschema-specifications attrs referencing rpds-py codetiming \\
        jax==0.10.2 jaxlib==0.10.2 ml_dtypes opt_einsum scipy
    /work/venvs/verl/bin/pip install omegaconf 'tensordict<=0.10' 'transformers<5.11' numpy
    PYTHONPATH=$PWD /work/venvs/verl/bin/python bench/verl_losses.py [--reps 7 --inner 3]

(verl's ``core_algos`` imports ray through ``verl.protocol`` at start-up; no
loss uses it. ``--no-deps`` keeps pip from replacing torch's CPU build.)

Two parts:

* **Check** (``--check``, on by default): on a small ragged batch (float32,
  masked positions holding NaN on the jaxent side) each jaxent loss and
  verl's same loss give the loss value, the gradient w.r.t. ``log_prob`` and
  the shared metrics; the maximum absolute differences are printed. Clip-Cov
  is checked with ``ratio = 1`` so that verl's random subset is every
  candidate (deterministic); verl's Clip-Cov ``pg_clipfrac`` is jaxent's
  ``selected_frac``, verl's KL-Cov ``ppo_kl`` is jaxent's ``abs_kl``.
* **Timing**: value and gradient w.r.t. ``log_prob`` on ``batch × time``
  tokens (default 256 × 4096, a quarter padding on average). jaxent: one
  ``jit(value_and_grad(has_aux=True))`` returning the loss's metrics dict
  (what the trainer logs), and the same without metrics. verl: its loss
  function (which always computes its metrics and moves them to the host with
  ``.item()``) and ``torch.autograd.grad``, at 1 and at 2 torch threads.
  After one compile/warm-up call each, every round visits the cases in a
  shuffled order; each case is called ``inner + 1`` times back to back and
  the first call is dropped. A speed-up is the median over rounds of (verl
  time / the same round's jaxent time), verl at its better thread count
  (the one with the lower median time); in brackets the ratio of best times.

Loss settings (the same on both sides): ``ppo_clip`` = verl ``vanilla``,
which always applies the dual clip ``c = 3`` (jaxent ``dual_clip=3.0``; the
trainer's default, no dual clip, is timed too); Clip-Cov and KL-Cov at ratio
2e-4, KL-Cov's β = 1 (verl ``ppo_kl_coef``); GSPO at ε = 3e-4 / 4e-4 with
``seq-mean-token-mean``; CISPO at 0.2; GMPO (verl ``geo_mean``) at 0.4.
Rollout correction (no gradient) is jaxent's ``rollout_correction`` plus
the three metrics the trainer logs against verl's
``compute_rollout_correction_and_rejection_mask`` (with its metrics).
"""
from __future__ import annotations

import argparse
import functools
import statistics
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from jaxent import losses

warnings.filterwarnings("ignore")

import torch  # noqa: E402
from verl.trainer.ppo import core_algos  # noqa: E402
from verl.trainer.ppo import rollout_corr_helper  # noqa: E402
from verl.workers.config.actor import ActorConfig, PolicyLossConfig  # noqa: E402

RATIO = 2e-4


def make_inputs(batch: int, length: int, seed: int = 0, rollout_noise: float = 0.02):
  """float32 ``lp, old, adv, rollout, mask`` (NumPy), the distribution of bench/losses.py."""
  rng = np.random.default_rng(seed)
  lp = (-rng.exponential(size=(batch, length)) * 1.5).astype(np.float32)
  old = (lp + 0.05 * rng.standard_normal((batch, length))).astype(np.float32)
  adv = np.repeat(rng.standard_normal((batch, 1)), length, axis=1).astype(np.float32)
  rollout = (old - 0.01 + rollout_noise * rng.standard_normal((batch, length))).astype(np.float32)
  lens = rng.integers(length // 2, length + 1, size=(batch, 1))
  mask = np.arange(length)[None] < lens
  return lp, old, adv, rollout, mask


def verl_config(loss_mode: str, clip: float = 0.2, *, kl_coef: float = 1.0,
                ratio: float = RATIO, clip_low=None, clip_high=None) -> ActorConfig:
  return ActorConfig(
      strategy="fsdp", ppo_micro_batch_size_per_gpu=1, rollout_n=1, clip_ratio=clip,
      clip_ratio_low=clip if clip_low is None else clip_low,
      clip_ratio_high=clip if clip_high is None else clip_high,
      policy_loss=PolicyLossConfig(loss_mode=loss_mode, clip_cov_ratio=ratio, kl_cov_ratio=ratio,
                                   ppo_kl_coef=kl_coef))


# name -> (jaxent loss(lp, old, adv, mask, key) -> (loss, metrics), verl mode, verl config, agg,
#          {verl metric: jaxent metric} compared by the check)
def loss_table(ratio: float):
  key = jax.random.key(0)
  common = {"actor/pg_clipfrac": "clipfrac", "actor/ppo_kl": "approx_kl"}
  return {
      "ppo_clip (dual clip 3)": (
          lambda lp, old, adv, m: losses.ppo_clip(lp, old, adv, m, dual_clip=3.0),
          "vanilla", verl_config("vanilla"), "token-mean", common),
      "ppo_clip (trainer default)": (
          lambda lp, old, adv, m: losses.ppo_clip(lp, old, adv, m),
          "vanilla", verl_config("vanilla"), "token-mean", None),
      "clip_cov": (
          lambda lp, old, adv, m: losses.clip_cov(lp, old, adv, m, key=key, ratio=ratio),
          "clip_cov", verl_config("clip_cov", ratio=ratio), "token-mean",
          {"actor/pg_clipfrac": "selected_frac", "actor/ppo_kl": "approx_kl"}),
      "kl_cov": (
          lambda lp, old, adv, m: losses.kl_cov(lp, old, adv, m, ratio=ratio, kl_coef=1.0),
          "kl_cov", verl_config("kl_cov", ratio=ratio, kl_coef=1.0), "token-mean",
          {"actor/ppo_kl": "abs_kl"}),
      "gspo": (
          lambda lp, old, adv, m: losses.gspo(lp, old, adv, m, clip_low=3e-4, clip_high=4e-4,
                                              agg="seq-mean-token-mean"),
          "gspo", verl_config("gspo", clip_low=3e-4, clip_high=4e-4), "seq-mean-token-mean",
          common),
      "cispo": (
          lambda lp, old, adv, m: losses.cispo(lp, old, adv, m, clip_low=0.2, clip_high=0.2),
          "cispo", verl_config("cispo"), "token-mean", common),
      "gmpo (verl geo_mean)": (
          lambda lp, old, adv, m: losses.gmpo(lp, old, adv, m, clip_low=0.4, clip_high=0.4),
          "geo_mean", verl_config("geo_mean", clip=0.4), "token-mean",
          {**common, "actor/pg_clipfrac_lower": "clipfrac_lower"}),
  }


# Rollout correction settings: jaxent kwargs, verl kwargs.
CORRECTIONS = {
    "rollout_correction (token TIS 2.0)": (
        dict(level="token", threshold=2.0),
        dict(rollout_is="token", rollout_is_threshold=2.0)),
    "rollout_correction (IcePop + 2 rejections)": (
        dict(level="token", threshold=(0.5, 5.0),
             rejection="token_k3:0.002,seq_mean_k1:0.98_1.02"),
        dict(rollout_is="token", rollout_is_threshold="0.5_5.0",
             rollout_rs="token_k3,seq_mean_k1", rollout_rs_threshold="0.002,0.98_1.02")),
}
# Checked, not timed (on 1M tokens every sequence weight would sit at the bound).
CHECK_CORRECTIONS = {
    "rollout_correction (seq TIS 2, batch-norm, seq_max_k2)": (
        dict(level="sequence", threshold=2.0, batch_normalize=True, rejection="seq_max_k2:0.02"),
        dict(rollout_is="sequence", rollout_is_threshold=2.0, rollout_is_batch_normalize=True,
             rollout_rs="seq_max_k2", rollout_rs_threshold="0.02")),
    "rollout_correction (seq IcePop, seq_sum_k3)": (
        dict(level="sequence", threshold=(0.8, 1.5), rejection="seq_sum_k3:0.05"),
        dict(rollout_is="sequence", rollout_is_threshold="0.8_1.5",
             rollout_rs="seq_sum_k3", rollout_rs_threshold="0.05")),
}


def jax_vg(fn, with_metrics: bool):
  if with_metrics:
    return jax.jit(jax.value_and_grad(fn, has_aux=True))
  return jax.jit(jax.value_and_grad(lambda *a: fn(*a)[0]))


def verl_vg(mode: str, cfg, agg: str):
  fn = core_algos.get_policy_loss_fn(mode)

  def run(lp, old, adv, m):
    loss, metrics = fn(old_log_prob=old, log_prob=lp, advantages=adv, response_mask=m,
                       loss_agg_mode=agg, config=cfg)
    (g,) = torch.autograd.grad(loss, lp)
    return loss.detach(), g, metrics
  return run


def jax_correction(kw):
  @jax.jit
  def run(old, rollout, mask):
    weights, keep = losses.rollout_correction(old, rollout, mask, **kw)
    # The metrics the trainer logs (jaxent.train._step._correct).
    n = jnp.maximum(mask.sum(), 1)
    return weights, keep, dict(rc_weight_mean=jnp.where(mask, weights, 0.0).sum() / n,
                               rc_weight_max=jnp.where(mask, weights, -jnp.inf).max(initial=0.0),
                               rc_masked_frac=(mask & ~keep).sum() / n)
  return run


def verl_correction(kw):
  def run(old, rollout, mask):
    return rollout_corr_helper.compute_rollout_correction_and_rejection_mask(
        old_log_prob=old, rollout_log_prob=rollout, response_mask=mask, **kw)
  return run


# ---------------------------------------------------------------------------------------------
# Check


def check(ratio_unused: float) -> None:
  del ratio_unused
  lp, old, adv, rollout, mask = make_inputs(8, 48, seed=1)
  # Wider log-ratios than the timing data so that every clip binds somewhere.
  rng = np.random.default_rng(2)
  old = (lp + 0.4 * rng.standard_normal(lp.shape)).astype(np.float32)
  rollout = (old - 0.01 + 0.05 * rng.standard_normal(lp.shape)).astype(np.float32)
  mask[3] = False                               # an empty row
  nan = np.where(mask, 0, np.nan).astype(np.float32)
  jx = [jnp.asarray(x + nan) for x in (lp, old, adv)] + [jnp.asarray(mask)]
  tm = torch.tensor(mask.astype(np.float32))
  print("check: 8 x 48 tokens (one empty row), float32; max |jaxent - verl|:")
  print(f"{'loss':>32s}  {'value':>9s}  {'grad':>9s}  metrics")
  table = loss_table(1.0)          # Clip-Cov: every candidate chosen, deterministic
  # KL-Cov with a ratio that selects a few tokens (ties are impossible here).
  table["kl_cov"] = (
      lambda lp, old, adv, m: losses.kl_cov(lp, old, adv, m, ratio=0.05, kl_coef=1.0),
      "kl_cov", verl_config("kl_cov", ratio=0.05, kl_coef=1.0), "token-mean",
      {"actor/ppo_kl": "abs_kl"})
  for name, (jfn, mode, cfg, agg, metric_map) in table.items():
    if metric_map is None:
      continue
    (jl, jm), jg = jax.value_and_grad(jfn, has_aux=True)(*jx)
    tlp = torch.tensor(lp, requires_grad=True)
    vl, vg, vm = verl_vg(mode, cfg, agg)(tlp, torch.tensor(old), torch.tensor(adv), tm)
    # verl's gradient at masked positions is 0 (its loss multiplies by the mask).
    dg = np.max(np.abs(np.asarray(jg) - vg.numpy()))
    dm = {v: abs(float(jm[j]) - float(vm[v])) for v, j in metric_map.items()}
    extra = ""
    if name == "clip_cov":
      extra = f" (chosen: {int(jm['num_selected'])})"
    if name == "kl_cov":
      extra = f" (chosen: {int(jm['num_selected'])})"
    print(f"{name:>32s}  {abs(float(jl) - float(vl)):9.2e}  {dg:9.2e}  "
          + ", ".join(f"{j}~{v.split('/')[1]} {d:.1e}" for (v, j), d in
                      zip(metric_map.items(), dm.values())) + extra)
  tro = torch.tensor(rollout)
  for name, (jkw, vkw) in {**CORRECTIONS, **CHECK_CORRECTIONS}.items():
    jw, jkeep, jmet = jax_correction(jkw)(jnp.asarray(old + nan), jnp.asarray(rollout + nan),
                                         jnp.asarray(mask))
    vproto, vkeep, vmet = verl_correction(vkw)(torch.tensor(old), tro, tm)
    vw = vproto.batch["rollout_is_weights"].numpy()
    dw = np.max(np.abs(np.where(mask, np.asarray(jw), 0) - vw))
    keep_diff = int(np.sum(np.asarray(jkeep) != (vkeep.numpy() > 0)))
    print(f"{name:>32s}  weights {dw:9.2e}  kept mask: {keep_diff} of {mask.size} differ, "
          f"{int(np.sum(np.asarray(jkeep)))} kept, {int(np.sum(vw != 0))} nonzero weights")


# ---------------------------------------------------------------------------------------------
# Timing


def time_rounds(cases, reps: int, inner: int, seed: int = 0) -> dict[str, list[float]]:
  """Per-call seconds: each round visits the cases shuffled; each runs ``inner + 1`` calls, the first dropped."""
  times = {name: [] for name in cases}
  order = np.random.default_rng(seed)
  for _ in range(reps):
    for name in order.permutation(list(cases)):
      call = cases[name]
      call()
      t0 = time.perf_counter()
      for _ in range(inner):
        call()
      times[name].append((time.perf_counter() - t0) / inner)
  return times


def _block(x):
  return jax.block_until_ready(x)


def bench(args) -> None:
  lp, old, adv, rollout, mask = make_inputs(args.batch, args.time)
  j_in = [jnp.asarray(x) for x in (lp, old, adv)] + [jnp.asarray(mask)]
  t_lp = torch.tensor(lp, requires_grad=True)
  t_in = (torch.tensor(old), torch.tensor(adv), torch.tensor(mask.astype(np.float32)))
  table = loss_table(args.ratio)
  names = [n for n in table if not args.only or any(s in n for s in args.only.split(","))]
  threads = [int(t) for t in args.threads.split(",")]
  print(f"tokens={args.batch}x{args.time} ratio={args.ratio} jax={jax.__version__} "
        f"torch={torch.__version__} reps={args.reps} inner={args.inner} threads={threads}")
  print(f"{'loss':>32s}  {'jaxent+metrics':>14s}  {'jaxent, loss only':>17s}  "
        f"{'verl (threads)':>15s}  speed-up with metrics (best)  without metrics (best)")
  rows = []
  for name in names:
    jfn, mode, cfg, agg, _ = table[name]
    jm, jl = jax_vg(jfn, True), jax_vg(jfn, False)
    v = verl_vg(mode, cfg, agg)

    def verl_call(t, v=v):
      torch.set_num_threads(t)
      return v(t_lp, *t_in)
    cases = {"jax_m": lambda jm=jm: _block(jm(*j_in)), "jax_l": lambda jl=jl: _block(jl(*j_in))}
    cases.update({f"verl{t}": functools.partial(verl_call, t) for t in threads})
    rows.append((name, _time_and_report(name, cases, threads, args)))
  c_in_j = (jnp.asarray(old), jnp.asarray(rollout), jnp.asarray(mask))
  c_in_t = (torch.tensor(old), torch.tensor(rollout), torch.tensor(mask.astype(np.float32)))
  for name, (jkw, vkw) in CORRECTIONS.items():
    if args.only and not any(s in name for s in args.only.split(",")):
      continue
    jc, vc = jax_correction(jkw), verl_correction(vkw)

    def verl_call(t, vc=vc):
      torch.set_num_threads(t)
      return vc(*c_in_t)
    cases = {"jax_m": lambda jc=jc: _block(jc(*c_in_j))}
    cases.update({f"verl{t}": functools.partial(verl_call, t) for t in threads})
    rows.append((name, _time_and_report(name, cases, threads, args)))


def _time_and_report(name, cases, threads, args):
  for call in cases.values():
    call()                                      # compile / warm-up
  times = time_rounds(cases, args.reps, args.inner)
  med = {k: statistics.median(v) for k, v in times.items()}
  best_t = min(threads, key=lambda t: med[f"verl{t}"])
  vt = times[f"verl{best_t}"]

  def speedup(k):
    if k not in times:
      return "-"
    r = [a / b for a, b in zip(vt, times[k])]
    return f"{statistics.median(r):5.2f}x ({min(vt) / min(times[k]):5.2f}x)"
  jl = f"{med['jax_l'] * 1e3:8.2f} ms" if "jax_l" in med else "-"
  print(f"{name:>32s}  {med['jax_m'] * 1e3:11.2f} ms  {jl:>17s}  "
        f"{med[f'verl{best_t}'] * 1e3:9.2f} ms ({best_t})  {speedup('jax_m'):>27s}  "
        f"{speedup('jax_l'):>22s}   [verl " + ", ".join(
            f"{t}t {med[f'verl{t}'] * 1e3:.1f}" for t in threads) + " ms]", flush=True)
  return med


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--time", type=int, default=4096)
  p.add_argument("--reps", type=int, default=7)
  p.add_argument("--inner", type=int, default=3, help="timed back-to-back calls after a dropped one")
  p.add_argument("--ratio", type=float, default=RATIO)
  p.add_argument("--threads", default="1,2", help="torch thread counts to try for verl")
  p.add_argument("--only", default="", help="comma-separated substrings of the loss names to time")
  p.add_argument("--no-check", dest="check", action="store_false")
  p.add_argument("--no-time", dest="time_it", action="store_false")
  args = p.parse_args()
  if args.check:
    check(args.ratio)
  if args.time_it:
    bench(args)


if __name__ == "__main__":
  main()
