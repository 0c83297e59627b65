"""The RL loop: a short function over small parts.

Per step: prompts -> sampler -> rewards -> advantages -> old (and reference)
log-probs -> PPO epochs x mini-batches of the jitted ``train_step`` ->
metrics -> (eval) -> (checkpoint). Everything the loop needs comes in a
:class:`Components`, built from the config by :func:`build_components` or
handed in by the demo.
"""
from __future__ import annotations

import dataclasses
import errno
import functools
import os
import sys
import time
from typing import Any, Callable, NamedTuple, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxent import diagnostics, rollout, sampler, sharding
from jaxent.config import Config, RolloutConfig
from jaxent.errors import TrainingError
from jaxent.train import _checkpoint, _logging, _shard
from jaxent.train._step import StepSpec, jit_logprobs, jit_train_step, make_optimizer
from jaxent.types import Batch, TrainState


class Policy(NamedTuple):
  """What the sampler needs of a model: its (static) config and its params."""
  config: Any
  params: Any


class PromptSource(Protocol):
  """An iterator of prompt batches whose position can be saved and restored."""
  def __next__(self) -> tuple[list[list[int]], list[str]]: ...
  def get_state(self) -> dict: ...
  def set_state(self, state: dict) -> None: ...


@dataclasses.dataclass
class Components:
  model_config: Any                                  # jaxent.models.ModelConfig
  params: Any                                        # initial policy params
  decode: Callable[[Sequence[int]], str]             # response token ids -> text
  pad_id: int
  eos_id: int | None
  prompts: PromptSource                              # training prompts
  reward: Callable[[list[str], list[str]], tuple[np.ndarray, dict]]  # (responses, answers) -> (rewards, counters)
  eval_set: tuple[list[list[int]], list[str]] | None = None          # held-out prompts and answers
  counters: Callable[[], dict] | None = None         # data counters to log (skipped rows, ...)


@dataclasses.dataclass
class TrainResult:
  state: TrainState
  history: list[dict]
  evals: list[dict]
  stopped_early: str | None = None


def _responses_text(tokens: np.ndarray, mask: np.ndarray, decode) -> list[str]:
  """Decodes each response up to and including its EOS (the decoder decides what to show)."""
  return [decode([int(t) for t in row[m > 0]]) for row, m in zip(tokens, mask)]


_EVAL_BATCH = 2048  # held-out prompts per sampler call when rollouts are not chunked


def evaluate(policy: Policy, comps: Components, cfg: Config, *, key, batch_size: int = _EVAL_BATCH,
             mesh=None) -> dict:
  """Greedy accuracy on the held-out set (mean reward and fraction correct).

  Every process holds the whole held-out set and scores all of it.
  """
  prompts, answers = comps.eval_set
  rewards = []
  for i in range(0, len(prompts), batch_size):
    out = sampler.generate(policy, prompts[i:i + batch_size], max_new_tokens=cfg.rollout.max_new_tokens,
                           temperature=0.0, eos_id=comps.eos_id, key=key, mesh=mesh)
    toks, mask = sharding.host_array(out.tokens), sharding.host_array(out.mask)
    texts = _responses_text(toks, mask, comps.decode)
    r, _ = comps.reward(texts, list(answers[i:i + batch_size]))
    rewards.append(np.asarray(r, np.float64))
  r = np.concatenate(rewards)
  return {"eval_reward": float(r.mean()), "eval_accuracy": float((r >= 0.5).mean())}


def generate_responses(policy: Policy, prompts: list[list[int]], ro: RolloutConfig, *, eos_id, key,
                       mesh=None) -> tuple[np.ndarray, np.ndarray]:
  """Samples ``n = ro.samples_per_prompt`` responses to each prompt: (tokens, mask) on this host.

  Row ``i * n + j`` is sample ``j`` of prompt ``i`` (GRPO groups stay whole and
  consecutive); ``tokens`` int32 and ``mask`` int32, both ``[len(prompts) * n, R]``.

  With ``c = ro.prompts_per_generate`` and ``0 < c < len(prompts)``, the
  sampler gets the prompts ``c`` at a time, so its KV cache holds ``c * n``
  rows rather than ``len(prompts) * n``: chunk ``i`` (prompts
  ``[i c, (i + 1) c)``) is drawn with ``fold_in(key, i)`` (deterministic, and
  the same on resume) and the chunks' rows are concatenated in order on the
  host. Every chunk has one shape, so a step compiles the sampler once, as
  unchunked: the prompt bucket of the step's longest prompt, and a batch
  bucket of ``c`` prompts (a last, shorter chunk is padded with dummy rows).
  Otherwise one call draws everything with ``key`` itself (the unchunked
  path; chunking with ``c = len(prompts)`` would change the draws).

  With several processes every process passes the same (gathered) prompts
  and receives every row, chunk by chunk.
  """
  c = ro.prompts_per_generate
  knobs = dict(max_new_tokens=ro.max_new_tokens, temperature=ro.temperature, top_p=ro.top_p,
               top_k=ro.top_k, eos_id=eos_id, num_samples=ro.samples_per_prompt, mesh=mesh)
  if c <= 0 or c >= len(prompts):
    out = sampler.generate(policy, prompts, key=key, **knobs)
    return sharding.host_array(out.tokens), sharding.host_array(out.mask)
  p_bucket = sampler.Sampler(policy.config).prompt_bucket(max(len(p) for p in prompts))
  toks, masks = [], []
  for i, lo in enumerate(range(0, len(prompts), c)):
    out = sampler.generate(policy, prompts[lo:lo + c], key=jax.random.fold_in(key, i),
                           prompt_buckets=(p_bucket,), batch_buckets=(c,), **knobs)
    # Host sync per chunk: the chunk's cache is freed before the next one is allocated.
    toks.append(sharding.host_array(out.tokens))
    masks.append(sharding.host_array(out.mask))
  return np.concatenate(toks), np.concatenate(masks)


def _generate_and_grade(policy: Policy, comps, ro: RolloutConfig, key, mesh, proc: int, n_proc: int):
  """One generation batch: the next ``prompts_per_step`` prompts, their responses, rewards.

  Returns ``(prompts, tokens, mask, rewards, reward_counters)``, every row of
  every process (prompts and rewards gathered), so all processes take the
  same refill decisions.
  """
  local_prompts, answers = next(comps.prompts)
  prompts = sharding.gather_prompts(local_prompts)  # this process's prompts -> all of them
  toks, mask = generate_responses(policy, prompts, ro, eos_id=comps.eos_id, key=key, mesh=mesh)
  # Each process grades the responses to its own prompts (it holds their answers).
  n_local = len(local_prompts) * ro.samples_per_prompt
  mine = slice(proc * n_local, (proc + 1) * n_local) if n_proc > 1 else slice(None)
  texts = _responses_text(toks[mine], mask[mine], comps.decode)
  rep_answers = [a for a in answers for _ in range(ro.samples_per_prompt)]
  rewards, reward_counters = comps.reward(texts, rep_answers)
  rewards = sharding.gather_rows(np.asarray(rewards))
  return prompts, toks, mask, rewards, sharding.sum_counters(reward_counters)


@functools.lru_cache(maxsize=8)
def _cov_stats_fn(mesh):
  """Covariance statistics of the whole rollout, from its mini-batches (replicated scalars)."""
  def fn(lps, advs, masks):
    cat = lambda xs: jnp.concatenate(xs, axis=0)  # noqa: E731
    return diagnostics.token_covariance(cat(lps), cat(advs), cat(masks))[1]
  return jax.jit(fn, out_shardings=sharding.replicated(mesh))


def _slice_rows(batch: Batch, start: int, stop: int) -> Batch:
  return jax.tree.map(lambda x: x[start:stop], batch)


def train(cfg: Config, run_dir: str, comps: Components, *, resume: bool = False,
          is_main: bool | None = None, on_step: Callable[[dict], None] | None = None,
          release_params: bool = False) -> TrainResult:
  """Runs ``cfg.train.steps`` RL steps, writing the run directory layout of DESIGN.md.

  The run is one SPMD program over the mesh of ``cfg.mesh`` (see
  ``sharding.plan_mesh``; a config that does not fit the devices raises
  ``ConfigError`` before anything is written). With several processes
  (``jax.distributed``), every process runs this function: each reads its own
  prompts (``comps.prompts``), grades its own responses, and the global batch
  is assembled on every host; only ``is_main`` (process 0) writes files.

  ``release_params``: set ``comps.params`` to None once the train state holds
  its copy, so the loaded parameters do not stay alive for the whole run (the
  CLI does; a caller that reuses ``comps`` leaves it False).
  """
  is_main = jax.process_index() == 0 if is_main is None else is_main
  plan = sharding.plan_mesh(cfg, jax.device_count(), process_count=jax.process_count(),
                          model_config=comps.model_config)
  mesh = plan.make_mesh()
  if plan.note and is_main:
    print(f"jaxent: {plan.note}", file=sys.stderr)
  os.makedirs(run_dir, exist_ok=True)
  if is_main:
    with open(_checkpoint.run_path(run_dir, "config.yaml"), "w", encoding="utf-8") as f:
      f.write(cfg.to_yaml())

  ro, tr = cfg.rollout, cfg.train
  rows = ro.prompts_per_step * ro.samples_per_prompt
  mb_rows = rows // tr.mini_batches
  updates_per_step = tr.ppo_epochs * tr.mini_batches
  tx = make_optimizer(cfg.optim, tr.steps * updates_per_step)
  spec = StepSpec(model=comps.model_config, loss=cfg.loss, micro_batches=tr.micro_batches,
                  temperature=ro.temperature)
  step_fn = jit_train_step(spec, tx, mesh=mesh)
  logprob_fn = jit_logprobs(spec, micro_batches=tr.micro_batches, mesh=mesh)
  cov_fn = _cov_stats_fn(mesh)
  rows_sharding = sharding.batch_sharding(mesh)
  # Greedy evaluation generates one response per prompt: with chunked rollouts it
  # takes as many prompts per call as a rollout chunk has rows (the same KV cache).
  chunked = 0 < ro.prompts_per_generate < ro.prompts_per_step
  eval_batch = ro.prompts_per_generate * ro.samples_per_prompt if chunked else _EVAL_BATCH
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
  n_proc, proc = jax.process_count(), jax.process_index()

  # Every file of the run resolves inside run_dir (a symlink out of it is refused).
  ckpt = _checkpoint.Checkpointer(_checkpoint.run_path(run_dir, "checkpoints"), keep=tr.keep_checkpoints)
  start = 0
  history: list[dict] = []
  evals: list[dict] = []
  metrics_path = _checkpoint.run_path(run_dir, "metrics.jsonl")
  if resume:
    last = ckpt.latest_step()
    if last is None:
      raise _checkpoint.RunDirError(f"--resume: no complete checkpoint under {ckpt.directory}",
                                    errno.ENOENT)  # bad input: CLI exit 2
    state, host = ckpt.restore(last, state)
    comps.prompts.set_state(host["data"])
    start = int(host["rl_step"])
    if is_main:
      _logging.truncate_after(metrics_path, start)
  elif is_main and os.path.exists(metrics_path):
    os.remove(metrics_path)
  logger = _logging.MetricsLogger(run_dir, enabled=is_main)

  def save(step: int) -> None:
    ckpt.save(step, state, {"rl_step": step, "data": comps.prompts.get_state()})

  bar = None
  if tr.progress and is_main:
    from tqdm import tqdm  # host only
    bar = tqdm(total=tr.steps, initial=start, desc=cfg.name, dynamic_ncols=True, leave=False)

  stopped = None
  try:
    for step in range(start, tr.steps):
      t0 = time.perf_counter()
      k = jax.random.fold_in(base_key, 1000 + step)  # per-step keys: resume reproduces them
      k_sample, k_eval = jax.random.split(k)
      # The sampler runs on the trainer's mesh and reads its (sharded) params.
      policy = Policy(comps.model_config, state.params)
      # DAPO dynamic sampling: with filter_groups, more batches of prompts until
      # prompts_per_step groups have unequal rewards (or max_gen_batches).
      gens, kept = [], 0
      for g in range(ro.max_gen_batches):
        # Batch 0 uses the step's key itself (a run without refills draws as before).
        key_g = k_sample if g == 0 else jax.random.fold_in(k_sample, g)
        gens.append(_generate_and_grade(policy, comps, ro, key_g, mesh, proc, n_proc))
        kept += int(np.sum(~rollout.uniform_groups(gens[-1][3], ro.samples_per_prompt)))
        if not ro.filter_groups or kept >= ro.prompts_per_step:
          break
      prompts, toks, mask, rewards, _ = rollout.select_groups(
          [p for x in gens for p in x[0]], np.concatenate([x[1] for x in gens]),
          np.concatenate([x[2] for x in gens]), np.concatenate([x[3] for x in gens]),
          num_groups=ro.prompts_per_step, samples_per_prompt=ro.samples_per_prompt)
      reward_counters = dict(gens[0][4])
      for x in gens[1:]:  # counts add up over the generation batches
        for name, count in x[4].items():
          numeric = isinstance(count, (int, float, np.number))
          reward_counters[name] = reward_counters.get(name, 0) + count if numeric else count
      t_sample = time.perf_counter() - t0

      host_batch, stats = rollout.assemble(prompts, toks, mask, np.asarray(rewards), pad_id=comps.pad_id,
                                           samples_per_prompt=ro.samples_per_prompt, eos_id=comps.eos_id,
                                           scale_by_std=ro.scale_by_std, filter_groups=ro.filter_groups)
      # Each mini-batch goes onto the mesh on its own, rows split over the
      # batch axes: no device ever holds the whole rollout, and slicing it
      # moves nothing between devices.
      minis = []
      for j in range(tr.mini_batches):
        mb = rollout.to_device(_slice_rows(host_batch, j * mb_rows, (j + 1) * mb_rows), rows_sharding)
        old_lp, _ = logprob_fn(state.params, mb)
        mb = mb._replace(old_log_prob=old_lp)
        if ref_params is not None:
          mb = mb._replace(ref_log_prob=logprob_fn(ref_params, mb)[0])
        minis.append(mb)
      cov = cov_fn([mb.old_log_prob for mb in minis], [mb.advantages for mb in minis],
                   [mb.response_mask for mb in minis])

      step_metrics = []
      for _ in range(tr.ppo_epochs):
        for mb in minis:
          state, m = step_fn(state, mb)
          step_metrics.append(m)
      # One device->host sync per RL step.
      step_metrics, cov = jax.device_get((step_metrics, cov))
      dt = time.perf_counter() - t0
      row = {k: float(np.mean([m[k] for m in step_metrics])) for k in step_metrics[0]}
      row["skipped"] = float(np.sum([m["skipped"] for m in step_metrics]))
      row["nonfinite_in_a_row"] = int(step_metrics[-1]["nonfinite_in_a_row"])
      row.update(cov)  # cov, cov_std, cov_p50 ... cov_frac_pos (diagnostics.token_covariance)
      row.update(dataclasses.asdict(stats))
      row["gen_batches"] = len(gens)
      row.update({f"reward_{k}": v for k, v in reward_counters.items()})
      if comps.counters is not None:
        row.update({f"data_{k}": v for k, v in comps.counters().items()})
      n_tok = float(host_batch.response_mask.sum())
      row.update(step_time_s=dt, sample_time_s=t_sample, tokens_per_s=n_tok * updates_per_step / max(dt, 1e-9))

      done = step + 1
      if comps.eval_set is not None and tr.eval_every and (done % tr.eval_every == 0 or done == tr.steps):
        ev = evaluate(Policy(comps.model_config, state.params), comps, cfg, key=k_eval, mesh=mesh,
                      batch_size=eval_batch)
        ev["step"] = done
        evals.append(ev)
        row.update(ev)
      row = logger.log(done, row)
      history.append(row)
      if on_step is not None:
        on_step(row)
      if bar is not None:
        bar.update(1)
        bar.set_postfix(reward=f"{row['reward_mean']:.3f}", ent=f"{row.get('entropy') or 0:.3f}")

      if row["nonfinite_in_a_row"] >= cfg.optim.max_nonfinite:
        save(done)
        stopped = (f"stopped at step {done}: {row['nonfinite_in_a_row']} non-finite updates in a row "
                   f"(optim.max_nonfinite={cfg.optim.max_nonfinite}); checkpoint {done} saved in "
                   f"{ckpt.directory}")
        raise TrainingError(stopped)
      if tr.ckpt_every and done % tr.ckpt_every == 0 and done != tr.steps:
        save(done)
    if tr.steps > start:
      save(tr.steps)
  finally:
    if bar is not None:
      bar.close()
    logger.close()
    ckpt.close()
  return TrainResult(state=state, history=history, evals=evals, stopped_early=stopped)
