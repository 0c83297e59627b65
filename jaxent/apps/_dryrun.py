"""``jaxent train CONFIG --dry-run``: check a run before it is staged on a pod.

Validates the config, builds the model abstractly (``model.path``: only its
``config.json`` is read; no weights), resolves the mesh and checks the batch
fits it, then lowers the jitted train step for the target mesh with abstract
inputs (``jax.ShapeDtypeStruct`` carrying the shardings):

* when the local devices can hold the mesh, it is compiled for them and XLA's
  memory analysis is reported;
* for a TPU topology by name (``--topology v5p:4x4x4``, needs libtpu) it is
  compiled ahead of time for those devices;
* otherwise (a 64-chip mesh on a laptop) it is lowered for an
  ``AbstractMesh`` of the configured shape and ``--platform``, not compiled.

Memory per device is also estimated analytically (parameters, Adam state,
gradients, activations of one micro-batch, the rollout's KV cache for the
prompts generated at once, ``rollout.prompts_per_generate``: every row's for
the static engine, the ``rollout.slots`` rows and the prompts' prefill for the
continuous one), since the analysis of a lowered-only program does not exist.
Nothing is written.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, AxisType

from jaxent import models, sampler, sharding
from jaxent.config import Config, ConfigError
from jaxent.sampler import prompt_bucket
from jaxent.sharding import AXES
from jaxent.train import (StepSpec, init_loss_state, jit_train_step, make_optimizer, model_config,
                          state_shardings)
from jaxent.types import Batch, TrainState

GB = 1e9


@dataclasses.dataclass
class DryRunReport:
  num_params: int
  mesh_shape: tuple[int, int, int]
  mode: str                        # "compiled" | "compiled-topology" | "lowered"
  platform: str
  per_device: dict[str, float]     # estimated bytes per device
  compiled: dict[str, int] | None  # XLA memory analysis (bytes per device) when compiled
  notes: list[str]


def _bytes_per_device(struct, shardings, sizes: dict[str, int]) -> float:
  total = 0.0
  for s, sh in zip(jax.tree.leaves(struct), jax.tree.leaves(shardings)):
    split = 1
    for ax in sh.spec:
      for a in (() if ax is None else ((ax,) if isinstance(ax, str) else ax)):
        split *= sizes[a]
    total += math.prod(s.shape) * np.dtype(s.dtype).itemsize / split
  return total


def _activation_bytes(mcfg, rows: int, seq: int, tensor: int) -> float:
  """One micro-batch's rows on one device, forward + backward, rough.

  Layer inputs kept for the backward pass (all layers with remat; without it,
  every layer's intermediates), plus one layer's working set: attention
  scores and probabilities ``[heads, Tq, T]`` and their gradients, with
  ``Tq = T`` for whole attention and ``Tq = attention_chunk`` when the
  queries are chunked (``T > attention_chunk > 0``; without remat every
  layer then keeps only its inputs for the chunks' recomputation, which the
  intermediates term covers), and the q/k/v/MLP intermediates.
  """
  act = np.dtype(mcfg.dtype).itemsize
  d, f, h = mcfg.hidden_size, mcfg.intermediate_size, mcfg.num_heads
  kv, hd, layers = mcfg.num_kv_heads, mcfg.head_dim, mcfg.num_layers
  heads_local = h / tensor
  chunk = mcfg.attention_chunk
  rows_q = chunk if 0 < chunk < seq else seq                  # query rows of scores at a time
  attn = 4 * heads_local * rows_q * seq * 4                   # scores, probs (f32) + their grads
  inter = seq * act * (2 * (h + 2 * kv) * hd / tensor + 3 * f / tensor + 4 * d)
  per_layer = attn + inter
  inputs = layers * seq * d * act
  if mcfg.remat:
    keep = inputs + per_layer
  elif rows_q < seq:  # chunked scores are recomputed in the backward pass, one layer's at a time
    keep = layers * inter + attn + inputs
  else:
    keep = layers * per_layer + inputs
  return rows * keep


class _GenShape(NamedTuple):
  calls: int    # sampler calls per RL step
  prompts: int  # prompts per call (the chunk)
  bucket: int   # padded prompt count of a call (a multiple of data x fsdp)
  rows: int     # rows generated per call: bucket x samples_per_prompt
  prompt_len: int  # P, the prompt bucket
  slots: int    # KV cache entries per cache row: P + max_new_tokens
  cache_rows: int  # KV cache rows: static, every row of the call; continuous, the S slots
  continuous: bool


def _generation_shape(cfg: Config, mcfg, batch_shards: int) -> _GenShape:
  """What one engine call of the loop holds (``rollout.generate``'s bucketing).

  The static engine pads the call's prompts to its batch bucket and keeps
  every row's cache. The continuous engine pads them to a power of two (a
  multiple of ``data x fsdp``), keeps only ``S`` rows of cache (``rollout.slots``,
  default ``sampler.default_slots(rows)``, a quarter, rounded up to a multiple of ``data x fsdp``) and
  refills them from the call's queue of rows.
  """
  ro = cfg.rollout
  chunk = ro.prompts_per_generate if 0 < ro.prompts_per_generate < ro.prompts_per_step \
      else ro.prompts_per_step
  p_len = prompt_bucket(cfg.data.max_prompt_len)
  calls = -(-ro.prompts_per_step // chunk)
  if ro.engine == "continuous":
    s, bp = sampler.ContinuousSampler(
        mcfg, slots=ro.slots or sampler.default_slots(chunk * ro.samples_per_prompt)
    ).padded_shape(chunk, batch_shards)
    return _GenShape(calls=calls, prompts=chunk, bucket=bp, rows=bp * ro.samples_per_prompt,
                     prompt_len=p_len, slots=p_len + ro.max_new_tokens, cache_rows=s,
                     continuous=True)
  smp = sampler.Sampler(mcfg, batch_buckets=(chunk,) if chunk < ro.prompts_per_step else None)
  bb = smp.batch_bucket(chunk, batch_shards)
  rows = bb * ro.samples_per_prompt
  return _GenShape(calls=calls, prompts=chunk, bucket=bb, rows=rows, prompt_len=p_len,
                   slots=p_len + ro.max_new_tokens, cache_rows=rows, continuous=False)


def _dtypes(mcfg) -> str:
  """``float32``, or ``float32 params, bfloat16 compute`` when the two differ."""
  p, c = np.dtype(mcfg.param_dtype).name, np.dtype(mcfg.dtype).name
  return p if p == c else f"{p} params, {c} compute"


def _abstract_state(mcfg, tx, shardings: TrainState, loss_state=()) -> TrainState:
  params = models.param_shapes(mcfg)
  opt = jax.eval_shape(tx.init, params)
  struct = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params, opt_state=opt,
                      key=jax.ShapeDtypeStruct((2,), jnp.uint32), loss_state=loss_state)
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      struct, shardings)


def _abstract_batch(rows: int, seq: int, resp: int, sharding) -> Batch:
  def s(width, dt):
    return jax.ShapeDtypeStruct((rows, width), dt, sharding=sharding)
  return Batch(tokens=s(seq, jnp.int32), positions=s(seq, jnp.int32),
               attention_mask=s(seq, jnp.int32), response_mask=s(resp, jnp.float32),
               advantages=s(resp, jnp.float32), old_log_prob=s(resp, jnp.float32),
               ref_log_prob=s(resp, jnp.float32), rollout_log_prob=s(resp, jnp.float32))


def _topology_devices(name: str, platform: str | None):
  from jax.experimental import topologies
  return list(topologies.get_topology_desc(name, platform=platform or "tpu").devices)


def dry_run(cfg: Config, *, topology: str | None = None, platform: str | None = None,
            log: Callable[[str], None] = print) -> DryRunReport:
  """Checks ``cfg`` against its target mesh and reports parameters and memory per device.

  Args:
    cfg: the validated run config.
    topology: the target's device count (``"64"``), or a TPU topology name
      for ``jax.experimental.topologies`` (``"v5p:4x4x4"``, needs libtpu) to
      compile for; default: the local devices when the mesh fits them, else
      the configured mesh shape.
    platform: the platform to lower for when compiling is not possible
      (default ``"tpu"``).

  Raises:
    ConfigError: the mesh does not fit the devices or the batch the mesh.
    SetupError: the model config cannot be read.
  """
  t0 = time.perf_counter()
  notes: list[str] = []
  mcfg = model_config(cfg)
  n_params = sum(math.prod(s.shape) for s in jax.tree.leaves(models.param_shapes(mcfg)))

  for key in ("train_path", "eval_path"):
    p = getattr(cfg.data, key)
    if cfg.data.task == "jsonl" and p is not None and not os.path.exists(p):
      notes.append(f"data.{key} {p} does not exist here (stage it before the run)")

  topo_devices = None
  n_target = None
  if topology is not None:
    if topology.isdigit():
      n_target = int(topology)
    else:
      try:
        topo_devices = _topology_devices(topology, platform)
        n_target = len(topo_devices)
      except Exception as e:  # noqa: BLE001 - no libtpu, unknown name, ...: say why, go on
        raise ConfigError(f"--topology {topology}: cannot describe it here ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}); give a device count instead, "
                          "e.g. --topology 64") from None
  n_local = jax.device_count()
  if n_target is None:
    sizes = (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    n_target = math.prod(sizes) if -1 not in sizes else n_local
  plan = sharding.plan_mesh(cfg, n_target, model_config=mcfg)
  if plan.note:
    notes.append(plan.note)

  tr, ro = cfg.train, cfg.rollout
  mb_rows, micro = cfg.mini_batch_rows, cfg.micro_batch_rows
  p_len = prompt_bucket(cfg.data.max_prompt_len)
  seq = p_len + ro.max_new_tokens
  tx = make_optimizer(cfg.optim, tr.steps * tr.ppo_epochs * tr.mini_batches)
  spec = StepSpec(model=mcfg, loss=cfg.loss, micro_batches=tr.micro_batches, temperature=ro.temperature,
                  correction=ro.correction)

  if topo_devices is not None:
    mesh = plan.make_mesh(topo_devices)
    mode, plat = "compiled-topology", topo_devices[0].platform
  elif plan.size <= n_local and n_local % plan.size == 0:
    mesh = plan.make_mesh()
    mode, plat = "compiled", jax.devices()[0].platform
  else:
    mesh = AbstractMesh(plan.shape, AXES, axis_types=(AxisType.Auto,) * len(AXES))
    mode, plat = "lowered", platform or "tpu"
    notes.append(f"the mesh needs {plan.size} devices and this machine has {n_local}: the train "
                 f"step is lowered for {plat}, not compiled")

  loss_state = jax.eval_shape(lambda: init_loss_state(cfg.loss))
  sh = state_shardings(mcfg, tx, mesh, loss_state=loss_state)
  state = _abstract_state(mcfg, tx, sh, loss_state)
  batch = _abstract_batch(mb_rows, seq, ro.max_new_tokens, sharding.batch_sharding(mesh))
  step = jit_train_step(spec, tx, mesh=mesh)
  compiled_stats = None
  if mode == "lowered":
    step.trace(state, batch).lower(lowering_platforms=(plat,))
  else:
    compiled = step.lower(state, batch).compile()
    ma = compiled.memory_analysis()
    if ma is not None:
      compiled_stats = {k: int(getattr(ma, f"{k}_size_in_bytes"))
                        for k in ("argument", "output", "alias", "temp", "generated_code")}

  sizes = dict(zip(AXES, plan.shape))
  params_b = _bytes_per_device(state.params, sh.params, sizes)
  opt_b = _bytes_per_device(state.opt_state, sh.opt_state, sizes)
  gen = _generation_shape(cfg, mcfg, plan.batch_shards)
  kv_heads = mcfg.num_kv_heads / (plan.shape[2] if mcfg.num_kv_heads % plan.shape[2] == 0 else 1)
  # Generation runs in rollout.compute_dtype when set (a copy of the weights in
  # that dtype beside the train state, and its KV cache), else in the model's.
  gen_dt = np.dtype(ro.compute_dtype or mcfg.dtype)
  copy_b = (params_b * gen_dt.itemsize / np.dtype(mcfg.param_dtype).itemsize
            if ro.compute_dtype else 0.0)
  # K and V of one token on one device (heads split over tensor when it divides them).
  token_b = 2 * mcfg.num_layers * kv_heads * mcfg.head_dim * gen_dt.itemsize
  kv_b = gen.cache_rows / plan.batch_shards * gen.slots * token_b
  per_device = {
      "params": params_b, "optimizer": opt_b, "gradients": params_b,
      "activations": _activation_bytes(mcfg, micro / plan.batch_shards, seq, plan.shape[2]),
      "rollout_kv_cache": kv_b,
  }
  per_device["train_total"] = params_b + opt_b + params_b + per_device["activations"]
  if gen.continuous:
    # The S slots' cache, the prompts' prefill cache [Bp, P] (kept for the
    # refills), and the output buffers: tokens, mask (int32), log-probs and
    # policy log-probs (float32) of every row, [Bp x n, max_new_tokens].
    prompts_b = gen.bucket / plan.batch_shards * gen.prompt_len * token_b
    out_b = gen.rows / plan.batch_shards * ro.max_new_tokens * 16
    per_device["rollout_total"] = params_b + opt_b + copy_b + kv_b + prompts_b + out_b
  else:
    # While generating: the train state and the cache; the prefill also holds the
    # cache of the chunk's prompts before it is repeated for their samples.
    per_device["rollout_total"] = (params_b + opt_b + copy_b
                                   + kv_b * (1 + 1 / ro.samples_per_prompt))

  src = cfg.model.path or "model.arch"
  d, f, t = plan.shape
  log(f"jaxent train --dry-run: {cfg.name}")
  log(f"  model     {mcfg.model_type} ({src}): {mcfg.num_layers} layers, hidden {mcfg.hidden_size}, "
      f"{mcfg.num_heads} heads / {mcfg.num_kv_heads} KV heads, vocab {mcfg.vocab_size}, "
      f"{_dtypes(mcfg)}{', remat' if mcfg.remat else ''}, attention "
      + (f"in query chunks of {mcfg.attention_chunk}" if 0 < mcfg.attention_chunk < seq
         else "whole"))
  log(f"  params    {n_params:,} ({n_params / 1e9:.2f} B)")
  log(f"  mesh      {plan.describe()}")
  log(f"  batch     {cfg.rows_per_step} rows per step = {tr.mini_batches} mini-batches of {mb_rows} = "
      f"{tr.micro_batches} micro-batches of {micro} ({micro // plan.batch_shards} per device over "
      f"data x fsdp = {d * f}); rows of {p_len} + {ro.max_new_tokens} = {seq} tokens")
  log(f"  rollout   {ro.prompts_per_step} prompts x {ro.samples_per_prompt} samples per step in "
      f"{gen.calls} sampler call{'s' if gen.calls > 1 else ''} of {gen.prompts} prompts"
      f"{f' (padded to {gen.bucket})' if gen.bucket != gen.prompts else ''}"
      + (f", continuous engine: {gen.rows} rows through {gen.cache_rows} slots, KV cache of "
         if gen.continuous else ": KV cache of ")
      + f"{gen.cache_rows} rows x {gen.slots} entries ({gen.cache_rows / plan.batch_shards:g} rows "
      f"per data x fsdp shard), {gen_dt.name}{' weight copy' if ro.compute_dtype else ''}")
  what = {"compiled": f"compiled for {plan.size} local {plat} devices",
          "compiled-topology": f"compiled ahead of time for {topology} ({plat})",
          "lowered": f"lowered for an abstract {d}x{f}x{t} {plat} mesh (not compiled)"}[mode]
  log(f"  step      {what} in {time.perf_counter() - t0:.1f} s")
  log("  memory per device, estimated: " + ", ".join(
      f"{k.replace('_', ' ')} {v / GB:.4g} GB" for k, v in per_device.items()))
  if compiled_stats is not None:
    log("  memory per device, XLA: " + ", ".join(
        f"{k.replace('_', ' ')} {v / GB:.4g} GB" for k, v in compiled_stats.items()))
  for n in notes:
    log(f"  note      {n}")
  return DryRunReport(num_params=n_params, mesh_shape=plan.shape, mode=mode, platform=plat,
                      per_device=per_device, compiled=compiled_stats, notes=notes)
