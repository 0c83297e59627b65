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
from jaxent.train import _checkpoint, _logging, _preempt, _rundir, _shard
from jaxent.train._step import (StepSpec, init_loss_state, jit_logprobs, jit_train_step,
                                make_optimizer)
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
  start_step: int = 0       # the step the run started (or resumed) from


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


@jax.jit
def _logprob_gap(rollout_lp, old_lp, mask):
  """(sum, max, count) of |log pi_sampler - log pi_old| over a mini-batch's response tokens."""
  valid = mask > 0
  gap = jnp.where(valid, jnp.abs(rollout_lp - old_lp), 0.0)
  return jnp.sum(gap), jnp.max(gap), jnp.sum(valid)


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
  # The sampler/trainer mismatch: the engine's log-probs against the trainer's old ones.
  gaps = [_logprob_gap(mb.rollout_log_prob, mb.old_log_prob, mb.response_mask) for mb in minis]
  step_metrics = []
  for _ in range(tr.ppo_epochs):
    for mb in minis:
      state, m = parts.step_fn(state, mb)
      step_metrics.append(m)
  # An engine with its own copy of the weights (vLLM) gets the updated policy now.
  sync_s = rollout.sync_engine(parts.engine, models.Model(params=state.params,
                                                           config=comps.model_config))
  step_metrics, cov, gaps = jax.device_get((step_metrics, cov, gaps))  # one device->host sync per RL step
  dt = time.perf_counter() - t0
  row = {k: float(np.mean([m[k] for m in step_metrics])) for k in step_metrics[0]}
  row["skipped"] = float(np.sum([m["skipped"] for m in step_metrics]))
  row["nonfinite_in_a_row"] = int(step_metrics[-1]["nonfinite_in_a_row"])
  row.update(cov)  # cov, cov_std, cov_p50 ... cov_frac_pos (diagnostics.token_covariance)
  row["rollout_logprob_diff"] = float(sum(g[0] for g in gaps) / max(sum(g[2] for g in gaps), 1))
  row["rollout_logprob_diff_max"] = float(max(g[1] for g in gaps))
  row.update(dataclasses.asdict(ro_out.stats))
  row["gen_batches"] = ro_out.gen_batches
  if sync_s is not None:
    row["weight_sync_s"] = sync_s
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
                  temperature=cfg.rollout.temperature, correction=cfg.rollout.correction)
  base_key = jax.random.PRNGKey(tr.seed)
  # The update donates its state: train on a copy (laid out on the mesh) so
  # the caller's params (and the reference policy) stay valid.
  loss_state = init_loss_state(cfg.loss)
  state_sh = _shard.state_shardings(comps.model_config, tx, mesh, loss_state=loss_state)
  state = _shard.init_train_state(comps.params, tx, jax.random.fold_in(base_key, 1), state_sh,
                                  loss_state=loss_state)
  ref_params = _shard.place(comps.params, state_sh.params) if cfg.loss.ref_kl_coef > 0 else None
  if release_params:
    # The train state (and the reference policy) hold copies: the loaded
    # parameters need not stay alive beside them for the whole run.
    comps.params = None
  ro = cfg.rollout
  engine = rollout.engine_of(ro)
  parts = _Parts(mesh=mesh, engine=engine,
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
          release_params: bool = False, overwrite: bool = False,
          run: _rundir.Claim | None = None) -> TrainResult:
  """Runs ``cfg.train.steps`` RL steps, writing the run directory layout of DESIGN.md.

  The run is one SPMD program over the mesh of ``cfg.mesh``
  (``sharding.plan_mesh``; a config that does not fit the devices raises
  ``ConfigError`` before anything is written). With several processes
  (``jax.distributed``), every process runs this function: each reads its own
  prompts (``comps.prompts``), grades its own responses, and the global batch
  is assembled on every host; only ``is_main`` (process 0) writes files.

  The run directory is claimed first (``_rundir.claim``: its lock, and a
  fresh run refused where a run already is unless ``overwrite``; a resume
  whose config does not fit the stored run refused) unless the caller passes
  its own ``run`` claim, which it then releases. SIGTERM and SIGINT stop the
  run after the current step with a checkpoint (``_preempt``; raises
  ``Preempted``).

  ``release_params``: set ``comps.params`` to None once the train state holds
  its copy, so the loaded parameters do not stay alive for the whole run (the
  CLI does; a caller that reuses ``comps`` leaves it False).
  """
  is_main = jax.process_index() == 0 if is_main is None else is_main
  own_claim = run is None
  if own_claim:
    run = _rundir.claim(run_dir, cfg, resume=resume, overwrite=overwrite, is_main=is_main)
    if is_main:
      for note in run.notes:
        print(f"jaxent: {note}", file=sys.stderr)
  # Signals are caught from here on: one during the setup stops the run before its first step.
  saved: dict = {"step": None}  # the newest complete checkpoint, for the preemption messages
  try:
    with _preempt.Preemption(cfg.train.preempt_grace_s, lambda: saved["step"]) as pre:
      return _train(cfg, run_dir, comps, run, pre, saved, is_main=is_main, on_step=on_step,
                    release_params=release_params)
  finally:
    if own_claim:
      run.release()


def _train(cfg: Config, run_dir: str, comps: Components, run: _rundir.Claim,
           pre: _preempt.Preemption, saved: dict, *, is_main: bool, on_step,
           release_params: bool) -> TrainResult:
  plan, parts, state = _setup(cfg, comps, release_params)
  if plan.note and is_main:
    print(f"jaxent: {plan.note}", file=sys.stderr)
  ckpt, start, state = _open_run(cfg, run_dir, comps, state, run=run, is_main=is_main)
  logger = _logging.MetricsLogger.for_config(cfg, run_dir, enabled=is_main)
  history, evals, closers = [], [], [ckpt.close, logger.close]
  saved["step"] = ckpt.latest_step()

  def save(step, st):
    ckpt.save(step, st, {"rl_step": step, "data": comps.prompts.get_state()})
    saved["step"] = step

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

  def preempted(done: int, st: TrainState) -> None:
    """After a step (or before the first): every process stops here if any got a signal."""
    stop, fits = pre.should_stop(ckpt.last_save_s)
    if not stop:
      return
    if saved["step"] != done and done > start and fits:
      save(done, st)
    pre.saved()
    raise pre.error(done, done if saved["step"] == done else None, ckpt.directory,
                    nothing_new=done == start)

  try:
    preempted(start, state)
    for step in range(start, cfg.train.steps):
      state, row = _rl_step(parts, cfg, comps, state, step)
      end = StepEnd(step + 1, cfg.train.steps, row, state)
      for hook in hooks:
        if hook.due(end.step, end.last):
          hook.fn(end)
      if end.step < end.last:
        preempted(end.step, state)
    if cfg.train.steps > start:
      save(cfg.train.steps, state)
  finally:
    for close in reversed(closers):
      close()
  return TrainResult(state=state, history=history, evals=evals, start_step=start)


def _open_run(cfg: Config, run_dir: str, comps: Components, state: TrainState, *,
              run: _rundir.Claim, is_main: bool):
  """Opens the checkpoints, restores on resume, then records the launch: (checkpointer, first
  step, state).

  Every file of the run resolves inside ``run_dir`` (a symlink out of it is
  refused). A resume restores the newest intact checkpoint (the train state
  and the data position; damaged ones are skipped with one warning line and
  moved aside) and drops the metrics rows after it. ``config.yaml`` and the
  history entry are written only after that, so a refused resume leaves the
  directory as it was.
  """
  ckpt = _checkpoint.Checkpointer(_checkpoint.run_path(run_dir, "checkpoints"),
                                  keep=cfg.train.keep_checkpoints, is_main=is_main)
  metrics_path = _checkpoint.run_path(run_dir, "metrics.jsonl")
  start = 0
  if run.resume:
    last = ckpt.latest_step()
    if last is not None and cfg.train.steps < last:
      ckpt.close()
      raise RunDirError(
          f"--resume: train.steps={cfg.train.steps} is below the run's latest checkpoint "
          f"({last}) in {ckpt.directory}; give train.steps >= {last} (--set train.steps=N) to "
          f"continue it (nothing was written)", errno.EINVAL)
    try:
      step, state, host, skipped = ckpt.restore_intact(state, host_keys=("rl_step", "data"))
    except BaseException:
      ckpt.close()
      raise
    if skipped and is_main:
      names = ", ".join(f"checkpoint {s} ({why})" for s, why in skipped)
      print(f"jaxent: warning: skipped damaged {names}, moved to "
            f"{os.path.join(os.path.dirname(ckpt.directory), _checkpoint.DAMAGED_DIR)}; resuming "
            f"from checkpoint {step}", file=sys.stderr)
    try:
      comps.prompts.set_state(host["data"])
      start = int(host["rl_step"])
    except Exception as e:  # noqa: BLE001 - a host state that parses but does not fit
      ckpt.close()
      raise RunDirError(f"--resume: checkpoint {step} in {ckpt.directory} has a host state this "
                        f"run cannot use: {e}", errno.EINVAL) from e
  run.record(cfg, start_step=start)
  if is_main and run.resume:
    _logging.truncate_after(metrics_path, start)
  return ckpt, start, state
