"""The update step: one jitted, donated function per optimizer mini-batch.

Covariance selection (Clip-Cov / KL-Cov) is made once over the WHOLE
mini-batch, as the paper describes, and only then is the gradient accumulated
over micro-batches. Every micro-batch loss is normalised by mini-batch-wide
counts (valid tokens, non-empty rows, padded length), so the accumulated
gradient is the full mini-batch gradient whatever ``micro_batches`` is.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxent import losses, models, ops, sharding
from jaxent.config import LossConfig, OptimConfig
from jaxent.errors import ConfigError
from jaxent.train import _shard
from jaxent.types import Batch, TrainState


@dataclasses.dataclass(frozen=True)
class StepSpec:
  """Everything static about the update step (hashable: a jit static arg)."""
  model: Any                   # jaxent.models.ModelConfig
  loss: LossConfig
  micro_batches: int = 1
  temperature: float = 1.0     # the rollout temperature: log-probs are of the sampled distribution
  correction: Any = None       # jaxent.config.CorrectionConfig: weights against the sampler's log-probs

  def __post_init__(self):
    try:
      check_correction(self.correction)
    except ValueError as e:
      raise ConfigError(f"rollout.correction: {e}") from None


def make_optimizer(cfg: OptimConfig, total_updates: int) -> optax.GradientTransformation:
  """clip_by_global_norm -> AdamW on a warm-up + constant/cosine schedule.

  Cached (configs are frozen), so runs in one process share compiled steps;
  ``total_updates`` only matters to a cosine schedule or a warm-up longer
  than the run.
  """
  total = max(int(total_updates), 1)
  if cfg.schedule != "cosine" and cfg.warmup_steps <= total:
    total = 0
  return _make_optimizer(cfg, total)


@functools.lru_cache(maxsize=32)
def _make_optimizer(cfg: OptimConfig, total_updates: int) -> optax.GradientTransformation:
  """``make_optimizer`` for a normalised ``total_updates`` (0: does not matter).

  Wrapped in ``apply_if_finite``: an update whose gradient holds NaN or inf is
  skipped (and counted in the optimizer state); the loop stops the run after
  ``cfg.max_nonfinite`` in a row.
  """
  total = max(int(total_updates), 1)
  warm = cfg.warmup_steps if total_updates == 0 else min(cfg.warmup_steps, total)
  if cfg.schedule == "cosine":
    after = optax.cosine_decay_schedule(cfg.lr, max(total - warm, 1))
  else:
    after = optax.constant_schedule(cfg.lr)
  sched = optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warm), after], [warm]) if warm else after
  tx = optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip),
      optax.adamw(sched, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay),
  )
  # Counted, never applied: the loop stops the run before this bound is hit.
  return optax.apply_if_finite(tx, max_consecutive_errors=cfg.max_nonfinite + 1)


def nonfinite_count(opt_state) -> jax.Array:
  """Consecutive skipped (non-finite) updates, from the ``apply_if_finite`` state."""
  return opt_state.notfinite_count


def init_state(params, tx: optax.GradientTransformation, key: jax.Array, loss: LossConfig | None = None
               ) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), key=key,
                    loss_state=init_loss_state(loss))


def _adaptive(lcfg: LossConfig) -> losses.AdaptiveEntropy | None:
  a = lcfg.adaptive_entropy
  if a is None:
    return None
  return losses.adaptive_entropy(lcfg.entropy_coef, target=a.target, delta=a.delta, min_coef=a.min,
                                 max_coef=a.max)


def init_loss_state(lcfg: LossConfig | None):
  """The loss's own state in the train state: the adaptive entropy coefficient, or ``()``."""
  adaptive = None if lcfg is None else _adaptive(lcfg)
  return () if adaptive is None else adaptive.init()


def check_correction(correction) -> None:
  """Raises ``ValueError`` naming the bad ``rollout.correction`` field (traced on shapes only)."""
  if correction is None:
    return
  x = jax.ShapeDtypeStruct((1, 1), jnp.float32)
  jax.eval_shape(functools.partial(losses.rollout_correction, level=correction.level,
                                   threshold=correction.threshold, rejection=correction.rejection,
                                   batch_normalize=correction.batch_normalize), x, x, x)


def response_logprobs(spec: StepSpec, params, batch: Batch):
  """log pi and full-vocabulary entropy of each response token, float32 [B, R].

  The model hands over final hidden states and the unembedding instead of
  logits, so [B, R, V] logits exist only one chunk at a time.
  """
  r = batch.response_mask.shape[1]
  p = batch.tokens.shape[1] - r
  out, _ = models.apply(spec.model, params, batch.tokens, batch.positions,
                        attention_mask=batch.attention_mask, return_hidden=True)
  hidden, kernel = out
  # logits at position P-1+t predict response token t.
  hidden = hidden[:, p - 1:p - 1 + r]
  temperature = spec.temperature if spec.temperature > 0 else 1.0
  return ops.logprobs_and_entropy(ops.HiddenAndHead(hidden, kernel), batch.tokens[:, p:],
                                  temperature=temperature)


def _split_micro(tree, n: int):
  """``[B, ...] -> [n, B/n, ...]``, micro-batch ``i`` holding rows ``i, i+n, i+2n, ...``.

  Strided rather than contiguous: with rows sharded over ``D`` devices (``D``
  dividing ``B/n``), every micro-batch takes ``B/(nD)`` rows from each device,
  so the split moves no data. The accumulated gradient does not depend on
  which rows share a micro-batch (selection and normalisers are mini-batch
  wide).
  """
  return jax.tree.map(lambda x: jnp.swapaxes(x.reshape((x.shape[0] // n, n) + x.shape[1:]), 0, 1),
                      tree)


def _merge_micro(x: jax.Array) -> jax.Array:
  """Inverse of ``_split_micro``: ``[n, B/n, ...] -> [B, ...]``."""
  return jnp.swapaxes(x, 0, 1).reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def _inputs(log_prob, batch: Batch, weights=None) -> losses.PolicyInputs:
  return losses.PolicyInputs(log_prob, batch.old_log_prob, batch.advantages, batch.response_mask, weights)


def _select(family: losses.PolicyLoss, lcfg: LossConfig, log_prob, batch: Batch, key):
  """The family's token selection, made without gradient."""
  return family.select(lcfg, _inputs(jax.lax.stop_gradient(log_prob), batch), key)


def _policy_loss(family: losses.PolicyLoss, lcfg: LossConfig, log_prob, entropy, batch: Batch,
                 selection, weights, norms, entropy_coef):
  """The configured loss on one micro-batch, normalised by mini-batch counts.

  ``entropy_coef`` is the adaptive coefficient (a traced scalar) or None for
  the fixed ``lcfg.entropy_coef``.
  """
  loss, m = family.loss(lcfg, _inputs(log_prob, batch, weights), selection, norms)
  common = dict(agg=lcfg.agg, **losses.agg_norms(norms))
  m = dict(m)
  m["pg_loss"] = loss
  if entropy_coef is not None:
    # Skywork-OR1 / TRL: a token-mean bonus, here over the mini-batch's tokens.
    ent_loss, _ = losses.entropy_bonus(entropy, batch.response_mask, agg="token-mean",
                                       num_tokens=norms["num_tokens"])
    loss = loss + entropy_coef * ent_loss
  elif lcfg.entropy_coef > 0:
    ent_loss, _ = losses.entropy_bonus(entropy, batch.response_mask, **common)  # = -agg(H)
    loss = loss + lcfg.entropy_coef * ent_loss
  if lcfg.ref_kl_coef > 0:
    kl, _ = losses.kl_penalty(log_prob, batch.ref_log_prob, batch.response_mask,
                              kind=lcfg.ref_kl_kind, **common)
    loss = loss + lcfg.ref_kl_coef * kl
    m["ref_kl"] = kl
  return loss, m


def _norms(mask: jax.Array) -> dict:
  """Mini-batch-wide normalisers for the aggregation modes, and the row count."""
  return dict(num_tokens=mask.sum(), num_seqs=(mask.sum(axis=1) > 0).sum(),
              max_len=jnp.asarray(mask.shape[1], jnp.float32), num_rows=mask.shape[0])


def _correct(c, batch: Batch) -> tuple[Batch, jax.Array, dict]:
  """Rollout correction over the whole mini-batch: ``(batch, weights, metrics)``.

  Rejected tokens leave the response mask (and so every count); the weights
  are computed on the original mask.
  """
  if batch.rollout_log_prob is None:
    raise ValueError("rollout.correction needs the sampler's log-probs: Batch.rollout_log_prob is None")
  mask = batch.response_mask
  weights, keep = losses.rollout_correction(batch.old_log_prob, batch.rollout_log_prob, mask,
                                            level=c.level, threshold=c.threshold, rejection=c.rejection,
                                            batch_normalize=c.batch_normalize)
  valid = mask > 0
  n = jnp.maximum(valid.sum(), 1)
  metrics = dict(rc_weight_mean=jnp.where(valid, weights, 0.0).sum() / n,
                 rc_weight_max=jnp.where(valid, weights, -jnp.inf).max(initial=0.0),
                 rc_masked_frac=(valid & ~keep).sum() / n)
  return batch._replace(response_mask=keep.astype(mask.dtype)), weights, metrics


def _with_keep(weights, keep):
  """``weights`` times the bool ``keep`` mask (either may be None)."""
  if keep is None:
    return weights
  k = keep.astype(jnp.float32)
  return k if weights is None else weights * k


def train_step_impl(spec: StepSpec, tx: optax.GradientTransformation, state: TrainState,
                    batch: Batch) -> tuple[TrainState, dict]:
  """One optimizer update on one mini-batch. Pure; jit with ``jit_train_step``."""
  n_micro = spec.micro_batches
  lcfg = spec.loss
  family = losses.policy_loss(lcfg.name)
  adaptive = _adaptive(lcfg)
  key, sel_key = jax.random.split(state.key)
  weights, pre_metrics = None, {}
  if spec.correction is not None:
    batch, weights, pre_metrics = _correct(spec.correction, batch)
  mask = batch.response_mask
  norms = _norms(mask)
  n_tok = jnp.maximum(norms["num_tokens"], 1.0)
  quantile = lcfg.top_entropy_quantile
  entropy_coef = state.loss_state.applied if adaptive is not None else None

  # Token choices over the whole mini-batch (the family's selection, the
  # top-entropy mask). With one micro-batch they are made inside the loss
  # from the same forward pass (no extra cost); with several, a forward pass
  # without gradient over the mini-batch comes first.
  needs_sel = family.select is not None
  needs_keep = quantile < 1
  selection = keep = None
  if (needs_sel or needs_keep) and n_micro > 1:
    def fwd(_, mb):
      return None, response_logprobs(spec, state.params, mb)
    _, (lp_all, ent_all) = jax.lax.scan(fwd, None, _split_micro(batch, n_micro))
    if needs_sel:
      selection = _select(family, lcfg, _merge_micro(lp_all), batch, sel_key)
    if needs_keep:
      keep = losses.top_entropy_mask(_merge_micro(ent_all), mask, quantile=quantile)

  def micro_loss(params, mb, sel, kept, w):
    lp, ent = response_logprobs(spec, params, mb)
    if needs_sel and sel is None:
      sel = _select(family, lcfg, lp, mb, sel_key)
    if needs_keep and kept is None:
      kept = losses.top_entropy_mask(jax.lax.stop_gradient(ent), mb.response_mask, quantile=quantile)
    loss, m = _policy_loss(family, lcfg, lp, ent, mb, sel, _with_keep(w, kept), norms, entropy_coef)
    mm = mb.response_mask
    # token sums, divided by the mini-batch count after accumulation
    m["entropy"] = jnp.where(mm > 0, ent, 0.0).sum() / n_tok
    m["log_prob"] = jnp.where(mm > 0, lp, 0.0).sum() / n_tok
    if needs_keep:
      m["entropy_mask_kept_frac"] = (kept & (mm > 0)).sum() / n_tok
    return loss, m

  def grad_fn(params, mb, sel, kept, w):
    # Gradients keep the parameters' layout (FSDP / tensor shards), also as
    # the scan carry that accumulates them.
    out, g = jax.value_and_grad(micro_loss, has_aux=True)(params, mb, sel, kept, w)
    return out, _shard.constrain_like_params(spec.model, g)

  if n_micro == 1:
    (loss, metrics), grads = grad_fn(state.params, batch, selection, keep, weights)
  else:
    split = functools.partial(_split_micro, n=n_micro)
    xs = (split(batch), *(None if x is None else split(x) for x in (selection, keep, weights)))

    def body(carry, xs):
      g_acc, l_acc = carry
      (l, m), g = grad_fn(state.params, *xs)
      return (jax.tree.map(jnp.add, g_acc, g), l_acc + l), m

    zeros = _shard.constrain_like_params(spec.model, jax.tree.map(jnp.zeros_like, state.params))
    (grads, loss), ms = jax.lax.scan(body, (zeros, jnp.zeros((), jnp.float32)), xs)
    # Normalised by mini-batch counts, the micro-batch metrics add up to the
    # mini-batch values; the one per-selected-token mean is re-weighted.
    metrics = {k: v.sum() for k, v in ms.items()}
    if "selected_cov_mean" in ms:
      n_sel = ms["num_selected"]
      metrics["selected_cov_mean"] = (ms["selected_cov_mean"] * n_sel).sum() / jnp.maximum(n_sel.sum(), 1.0)

  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  finite = jnp.stack([jnp.isfinite(g).all() for g in jax.tree.leaves(grads)]).all()
  metrics.update(pre_metrics)
  metrics.update(loss=loss, grad_norm=optax.tree.norm(grads),
                 skipped=1 - finite.astype(jnp.int32),
                 # apply_if_finite (make_optimizer) skips those updates and counts them
                 nonfinite_in_a_row=getattr(opt_state, "notfinite_count", jnp.zeros((), jnp.int32)))
  loss_state = state.loss_state
  if adaptive is not None:
    # The coefficient set from this step's entropy acts from the next step on.
    metrics["entropy_coef"] = entropy_coef
    _, loss_state = adaptive.update(metrics["entropy"], loss_state)
  new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, key=key,
                         loss_state=loss_state)
  return new_state, metrics


def _in_mesh(fn, mesh):
  """``fn`` traced under ``mesh`` (so ``constrain`` and the sharded top-k see it)."""
  if mesh is None:
    return fn
  abstract = mesh if isinstance(mesh, jax.sharding.AbstractMesh) else mesh.abstract_mesh

  @functools.wraps(fn)
  def wrapped(*args):
    with jax.sharding.use_abstract_mesh(abstract):
      return fn(*args)
  return wrapped


def jit_train_step(spec: StepSpec, tx: optax.GradientTransformation, *, mesh=None,
                   in_shardings=None, out_shardings=None):
  """``train_step(state, batch) -> (state, metrics)``, jitted, state donated.

  With ``mesh`` (a ``Mesh``, or an ``AbstractMesh`` to lower ahead of time),
  the state is laid out by ``_shard.state_shardings`` (params by logical axes,
  optimizer state like its params, scalars replicated), the batch rows over
  ``("data", "fsdp")``, the metrics replicated; ``in_shardings`` /
  ``out_shardings`` override those. Cached per (spec, tx, mesh) when no
  explicit shardings are given.
  """
  if in_shardings is None and out_shardings is None:
    return _jit_train_step(spec, tx, mesh)
  return _make_train_step(spec, tx, mesh, in_shardings, out_shardings)


def step_shardings(spec: StepSpec, tx: optax.GradientTransformation, mesh):
  """``(in_shardings, out_shardings)`` of the train step on ``mesh``."""
  state = _shard.state_shardings(spec.model, tx, mesh, loss_state=init_loss_state(spec.loss))
  return (state, sharding.batch_sharding(mesh)), (state, sharding.replicated(mesh))


@functools.lru_cache(maxsize=32)
def _jit_train_step(spec, tx, mesh):
  if mesh is None:
    return _make_train_step(spec, tx, None, None, None)
  return _make_train_step(spec, tx, mesh, *step_shardings(spec, tx, mesh))


def _make_train_step(spec, tx, mesh, in_shardings, out_shardings):
  fn = _in_mesh(functools.partial(train_step_impl, spec, tx), mesh)
  kw = {}
  if in_shardings is not None:
    kw["in_shardings"] = in_shardings
  if out_shardings is not None:
    kw["out_shardings"] = out_shardings
  return jax.jit(fn, donate_argnums=(0,), **kw)


@functools.lru_cache(maxsize=32)
def jit_logprobs(spec: StepSpec, micro_batches: int = 1, mesh=None):
  """Jitted ``(params, batch) -> (log_prob, entropy)`` [B, R], in micro-batch chunks.

  With ``mesh``: params laid out as in the train step, batch rows and outputs
  over ``("data", "fsdp")``.
  """
  def fn(params, batch):
    if micro_batches == 1:
      return response_logprobs(spec, params, batch)
    def body(_, mb):
      return None, response_logprobs(spec, params, mb)
    _, (lp, ent) = jax.lax.scan(body, None, _split_micro(batch, micro_batches))
    return _merge_micro(lp), _merge_micro(ent)
  if mesh is None:
    return jax.jit(fn)
  rows = sharding.batch_sharding(mesh)
  return jax.jit(_in_mesh(fn, mesh), in_shardings=(models.param_shardings(spec.model, mesh), rows),
                 out_shardings=rows)
