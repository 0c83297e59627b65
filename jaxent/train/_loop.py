"""The RL loop: a short function over small parts and every-N hooks.

Per step (``_rl_step``): the rollout layer's ``collect`` (prompts -> engine ->
rewards -> advantages -> Batch) -> old (and reference) log-probs -> PPO
epochs x mini-batches of the jitted ``train_step`` -> the step's metrics row.
After each step the hooks run in order (``Hook``: a function and its cadence,
as levanter's ``trainer.add_hook(fn, every=N)``): held-out evaluation,
logging, the caller's ``on_step``, the progress bar, the non-finite stop,
the checkpoint cadence. Everything the loop needs comes in a
:class:`Components`, built from the config by ``build_components`` or handed
in by the demo.
"""
from __future__ import annotations

import dataclasses
import errno
import functools
import os
import sys
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxent import diagnostics, models, rollout, sharding
from jaxent import eval as eval_lib
from jaxent.config import Config
from jaxent.errors import RunDirError, TrainingError
from jaxent.train import _checkpoint, _logging, _shard
from jaxent.train._step import StepSpec, jit_logprobs, jit_train_step, make_optimizer
from jaxent.types import Batch, TrainState

_EVAL_BATCH = 2048  # held-out prompts per engine call when rollouts are not chunked


@dataclasses.dataclass
class Components:
  model_config: Any                                  # jaxent.models.ModelConfig
  params: Any                                        # initial policy params
  task: rollout.Task                                 # decode, grade, pad and EOS ids
  prompts: rollout.PromptSource                      # training prompts
  eval_set: tuple[list[list[int]], list[str]] | None = None  # held-out prompts and answers
  counters: Callable[[], dict] | None = None         # data counters to log (skipped rows, ...)


@dataclasses.dataclass
class TrainResult:
  state: TrainState
  history: list[dict]
  evals: list[dict]
  stopped_early: str | None = None


@dataclasses.dataclass
class StepEnd:
  """What a hook sees after an RL step; hooks may add to (or replace) ``row``."""
  step: int                 # steps done (1-based)
  last: int                 # the run's final step (train.steps)
  row: dict                 # the step's metrics
  state: TrainState


class Hook(NamedTuple):
  """``fn`` after every ``every``-th step (0: never); ``at_end``: also after the last step."""
  fn: Callable[[StepEnd], None]
  every: int = 1
  at_end: bool = False

  def due(self, step: int, last: int) -> bool:
    return bool(self.every) and (step % self.every == 0 or (self.at_end and step == last))


class _Parts(NamedTuple):
  """The jitted functions and layout one run uses."""
  mesh: Any
  engine: rollout.Engine
  step_fn: Callable
  logprob_fn: Callable
  cov_fn: Callable
  rows_sharding: Any
  ref_params: Any
  base_key: jax.Array


@functools.lru_cache(maxsize=8)
def _cov_stats_fn(mesh):
  """Covariance statistics of the whole rollout, from its mini-batches (replicated scalars)."""
  def fn(lps, advs, masks):
    cat = lambda xs: jnp.concatenate(xs, axis=0)  # noqa: E731
    return diagnostics.token_covariance(cat(lps), cat(advs), cat(masks))[1]
  return jax.jit(fn, out_shardings=sharding.replicated(mesh))


def _slice_rows(batch: Batch, start: int, stop: int) -> Batch:
  return jax.tree.map(lambda x: x[start:stop], batch)


def _step_keys(base_key, step: int) -> tuple[jax.Array, jax.Array]:
  """(sampling key, evaluation key) of a step: per-step keys, so resume reproduces them."""
  return tuple(jax.random.split(jax.random.fold_in(base_key, 1000 + step)))


def _rl_step(parts: _Parts, cfg: Config, comps: Components, state: TrainState, step: int):
  """One RL step: rollout, old log-probs, the updates; returns (state, metrics row)."""
  ro, tr = cfg.rollout, cfg.train
  t0 = time.perf_counter()
  # The engine runs on the trainer's mesh and reads its (sharded) params.
  policy = models.Model(params=state.params, config=comps.model_config)
  ro_out = rollout.collect(parts.engine, policy, comps.prompts, comps.task, ro,
                           key=_step_keys(parts.base_key, step)[0], mesh=parts.mesh)
  t_sample = time.perf_counter() - t0
  # Each mini-batch goes onto the mesh on its own, rows split over the batch
  # axes: no device ever holds the whole rollout, and slicing it moves nothing
  # between devices.
  minis, mb_rows = [], cfg.mini_batch_rows
  for j in range(tr.mini_batches):
    mb = rollout.to_device(_slice_rows(ro_out.batch, j * mb_rows, (j + 1) * mb_rows),
                           parts.rows_sharding)
    mb = mb._replace(old_log_prob=parts.logprob_fn(state.params, mb)[0])
    if parts.ref_params is not None:
      mb = mb._replace(ref_log_prob=parts.logprob_fn(parts.ref_params, mb)[0])
    minis.append(mb)
  cov = parts.cov_fn([mb.old_log_prob for mb in minis], [mb.advantages for mb in minis],
                     [mb.response_mask for mb in minis])
  step_metrics = []
  for _ in range(tr.ppo_epochs):
    for mb in minis:
      state, m = parts.step_fn(state, mb)
      step_metrics.append(m)
  step_metrics, cov = jax.device_get((step_metrics, cov))  # one device->host sync per RL step
  dt = time.perf_counter() - t0
  row = {k: float(np.mean([m[k] for m in step_metrics])) for k in step_metrics[0]}
  row["skipped"] = float(np.sum([m["skipped"] for m in step_metrics]))
  row["nonfinite_in_a_row"] = int(step_metrics[-1]["nonfinite_in_a_row"])
  row.update(cov)  # cov, cov_std, cov_p50 ... cov_frac_pos (diagnostics.token_covariance)
  row.update(dataclasses.asdict(ro_out.stats))
  row["gen_batches"] = ro_out.gen_batches
  row.update({f"reward_{k}": v for k, v in ro_out.reward_counters.items()})
  if comps.counters is not None:
    row.update({f"data_{k}": v for k, v in comps.counters().items()})
  n_tok = float(ro_out.batch.response_mask.sum())
  updates = tr.ppo_epochs * tr.mini_batches
  row.update(step_time_s=dt, sample_time_s=t_sample, tokens_per_s=n_tok * updates / max(dt, 1e-9))
  return state, row


def _setup(cfg: Config, comps: Components, release_params: bool):
  """The mesh, the jitted functions and the initial train state of a run."""
  plan = sharding.plan_mesh(cfg, jax.device_count(), process_count=jax.process_count(),
                            model_config=comps.model_config)
  mesh = plan.make_mesh()
  tr = cfg.train
  tx = make_optimizer(cfg.optim, tr.steps * tr.ppo_epochs * tr.mini_batches)
  spec = StepSpec(model=comps.model_config, loss=cfg.loss, micro_batches=tr.micro_batches,
                  temperature=cfg.rollout.temperature)
  base_key = jax.random.PRNGKey(tr.seed)
  # The update donates its state: train on a copy (laid out on the mesh) so
  # the caller's params (and the reference policy) stay valid.
  state_sh = _shard.state_shardings(comps.model_config, tx, mesh)
  state = _shard.init_train_state(comps.params, tx, jax.random.fold_in(base_key, 1), state_sh)
  ref_params = _shard.place(comps.params, state_sh.params) if cfg.loss.ref_kl_coef > 0 else None
  if release_params:
    # The train state (and the reference policy) hold copies: the loaded
    # parameters need not stay alive beside them for the whole run.
    comps.params = None
  parts = _Parts(mesh=mesh, engine=rollout.make_engine("static"),
                 step_fn=jit_train_step(spec, tx, mesh=mesh),
                 logprob_fn=jit_logprobs(spec, micro_batches=tr.micro_batches, mesh=mesh),
                 cov_fn=_cov_stats_fn(mesh), rows_sharding=sharding.batch_sharding(mesh),
                 ref_params=ref_params, base_key=base_key)
  return plan, parts, state


def _eval_hook(parts: _Parts, cfg: Config, comps: Components, evals: list) -> Hook:
  """Greedy held-out accuracy every ``train.eval_every`` steps and after the last."""
  ro = cfg.rollout
  # Greedy evaluation generates one response per prompt: with chunked rollouts it
  # takes as many prompts per call as a rollout chunk has rows (the same KV cache).
  chunked = 0 < ro.prompts_per_generate < ro.prompts_per_step
  batch = ro.prompts_per_generate * ro.samples_per_prompt if chunked else _EVAL_BATCH

  def run(end: StepEnd) -> None:
    prompts, answers = comps.eval_set
    ev = eval_lib.heldout_metrics(
        parts.engine, models.Model(params=end.state.params, config=comps.model_config), prompts,
        answers, task=comps.task, max_new_tokens=ro.max_new_tokens, batch_size=batch,
        key=_step_keys(parts.base_key, end.step - 1)[1], mesh=parts.mesh)
    ev["step"] = end.step
    evals.append(ev)
    end.row.update(ev)

  return Hook(run, every=cfg.train.eval_every if comps.eval_set is not None else 0, at_end=True)


def _progress_hook(cfg: Config, start: int, closers: list) -> Hook:
  from tqdm import tqdm  # host only
  bar = tqdm(total=cfg.train.steps, initial=start, desc=cfg.name, dynamic_ncols=True, leave=False)
  closers.append(bar.close)

  def run(end: StepEnd) -> None:
    bar.update(1)
    bar.set_postfix(reward=f"{end.row['reward_mean']:.3f}", ent=f"{end.row.get('entropy') or 0:.3f}")

  return Hook(run)


def train(cfg: Config, run_dir: str, comps: Components, *, resume: bool = False,
          is_main: bool | None = None, on_step: Callable[[dict], None] | None = None,
          release_params: bool = False) -> TrainResult:
  """Runs ``cfg.train.steps`` RL steps, writing the run directory layout of DESIGN.md.

  The run is one SPMD program over the mesh of ``cfg.mesh``
  (``sharding.plan_mesh``; a config that does not fit the devices raises
  ``ConfigError`` before anything is written). With several processes
  (``jax.distributed``), every process runs this function: each reads its own
  prompts (``comps.prompts``), grades its own responses, and the global batch
  is assembled on every host; only ``is_main`` (process 0) writes files.

  ``release_params``: set ``comps.params`` to None once the train state holds
  its copy, so the loaded parameters do not stay alive for the whole run (the
  CLI does; a caller that reuses ``comps`` leaves it False).
  """
  is_main = jax.process_index() == 0 if is_main is None else is_main
  plan, parts, state = _setup(cfg, comps, release_params)
  if plan.note and is_main:
    print(f"jaxent: {plan.note}", file=sys.stderr)
  ckpt, start, state = _open_run(cfg, run_dir, comps, state, resume=resume, is_main=is_main)
  logger = _logging.MetricsLogger.for_config(cfg, run_dir, enabled=is_main)
  history, evals, closers = [], [], [ckpt.close, logger.close]
  save = lambda step, st: ckpt.save(step, st, {"rl_step": step, "data": comps.prompts.get_state()})  # noqa: E731

  def log(end: StepEnd) -> None:
    end.row = logger.log(end.step, end.row)
    history.append(end.row)

  def stop_if_nonfinite(end: StepEnd) -> None:
    if end.row["nonfinite_in_a_row"] >= cfg.optim.max_nonfinite:
      save(end.step, end.state)
      raise TrainingError(
          f"stopped at step {end.step}: {end.row['nonfinite_in_a_row']} non-finite updates in a "
          f"row (optim.max_nonfinite={cfg.optim.max_nonfinite}); checkpoint {end.step} saved in "
          f"{ckpt.directory}")

  def checkpoint(end: StepEnd) -> None:
    if end.step != end.last:  # the last step is saved after the loop
      save(end.step, end.state)

  hooks = [_eval_hook(parts, cfg, comps, evals), Hook(log)]
  if on_step is not None:
    hooks.append(Hook(lambda end: on_step(end.row)))
  if cfg.train.progress and is_main:
    hooks.append(_progress_hook(cfg, start, closers))
  hooks += [Hook(stop_if_nonfinite), Hook(checkpoint, every=cfg.train.ckpt_every)]
  try:
    for step in range(start, cfg.train.steps):
      state, row = _rl_step(parts, cfg, comps, state, step)
      end = StepEnd(step + 1, cfg.train.steps, row, state)
      for hook in hooks:
        if hook.due(end.step, end.last):
          hook.fn(end)
    if cfg.train.steps > start:
      save(cfg.train.steps, state)
  finally:
    for close in reversed(closers):
      close()
  return TrainResult(state=state, history=history, evals=evals)


def _open_run(cfg: Config, run_dir: str, comps: Components, state: TrainState, *, resume: bool,
              is_main: bool):
  """Writes ``config.yaml`` and opens the checkpoints: (checkpointer, first step, state).

  Every file of the run resolves inside ``run_dir`` (a symlink out of it is
  refused). ``resume`` restores the latest complete checkpoint (the train
  state and the data position) and drops the metrics rows after it; a fresh
  run starts ``metrics.jsonl`` anew.
  """
  os.makedirs(run_dir, exist_ok=True)
  if is_main:
    with open(_checkpoint.run_path(run_dir, "config.yaml"), "w", encoding="utf-8") as f:
      f.write(cfg.to_yaml())
  ckpt = _checkpoint.Checkpointer(_checkpoint.run_path(run_dir, "checkpoints"),
                                  keep=cfg.train.keep_checkpoints)
  metrics_path = _checkpoint.run_path(run_dir, "metrics.jsonl")
  if not resume:
    if is_main and os.path.exists(metrics_path):
      os.remove(metrics_path)
    return ckpt, 0, state
  last = ckpt.latest_step()
  if last is None:
    raise RunDirError(f"--resume: no complete checkpoint under {ckpt.directory}", errno.ENOENT)
  state, host = ckpt.restore(last, state)
  comps.prompts.set_state(host["data"])
  start = int(host["rl_step"])
  if is_main:
    _logging.truncate_after(metrics_path, start)
  return ckpt, start, state
