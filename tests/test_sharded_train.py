"""Sharded training on the 8-device CPU mesh equals training on one device.

The update step on meshes (8,1,1), (2,4,1) and (2,2,2) gives the single-device
losses, metrics, gradient moments and parameters for PPO-clip, Clip-Cov (same
key) and KL-Cov, with several micro-batches too; the train state is laid out
by the logical-axis table; a short ``train()`` on a (2,2,2) mesh logs the same
metrics as on one device; bad meshes and batches fail at start with numbers.
"""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxent import config as C
from jaxent import models, sampler, sharding
from jaxent.config import LossConfig, OptimConfig
from jaxent.sharding import make_mesh
from jaxent.train import _build, _loop, _shard
from jaxent.train import _step as S
from jaxent.types import Batch
from tests._tiny import loop_config, random_batch

# vocab 24 and 4 heads / 2 KV heads: every axis of the (2,2,2) mesh shards something.
CFG = models.ModelConfig(model_type="qwen2", vocab_size=24, hidden_size=32, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=8, intermediate_size=64, tie_word_embeddings=True)
B, PL, R = 16, 8, 6
# Adam with a large eps: a near-zero gradient's float noise gives a near-zero
# step instead of a sign-like full step, so parameters compare tightly.
TX = S.make_optimizer(OptimConfig(lr=1e-2, eps=1e-3, grad_clip=1e9), total_updates=10)
LOSSES = {
    "ppo_clip": LossConfig(name="ppo_clip", clip_high=0.28, dual_clip=3.0),
    "clip_cov": LossConfig(name="clip_cov", ratio=0.2, cov_lb=-1e9, cov_ub=1e9),
    "kl_cov": LossConfig(name="kl_cov", ratio=0.2, kl_coef=1.0),
}
# Every mesh and every loss; both selection paths: inside the loss (one
# micro-batch) and a gradient-free pass over the mini-batch first (several).
CASES = [((8, 1, 1), "kl_cov", 1), ((2, 4, 1), "ppo_clip", 2), ((2, 2, 2), "clip_cov", 4)]
# Compile time dominates this file: LLVM's optimisations are not needed to
# compare numbers (about half the compile time on CPU).
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@functools.lru_cache(maxsize=None)
def _params():
  return models.init_model(CFG, seed=0).params


def _batch(seed=0) -> Batch:
  return random_batch(CFG.vocab_size, B, PL, R, seed)


KEY = jax.random.PRNGKey(7)


@functools.lru_cache(maxsize=None)
def _single(loss, micro):
  """One update on one device, no shardings anywhere."""
  spec = S.StepSpec(model=CFG, loss=LOSSES[loss], micro_batches=micro)
  state = S.init_state(jax.tree.map(jnp.copy, _params()), TX, KEY)
  batch = jax.tree.map(jnp.asarray, _batch())
  step = jax.jit(functools.partial(S.train_step_impl, spec, TX)).lower(state, batch).compile(FAST)
  return jax.device_get(step(state, batch))


def _moments(state):
  adam = state.opt_state.inner_state[1][0]          # apply_if_finite(chain(clip, adamw))
  return adam.mu, adam.nu


@pytest.mark.parametrize("shape,loss,micro", CASES, ids=[f"{'x'.join(map(str, s))}-{l}-m{m}"
                                                         for s, l, m in CASES])
def test_sharded_step_equals_single_device(shape, loss, micro):
  mesh = make_mesh(*shape)
  spec = S.StepSpec(model=CFG, loss=LOSSES[loss], micro_batches=micro)
  sh = _shard.state_shardings(CFG, TX, mesh)
  state = _shard.init_train_state(_params(), TX, KEY, sh)
  batch = jax.device_put(_batch(), sharding.batch_sharding(mesh))
  step = S.jit_train_step(spec, TX, mesh=mesh).lower(state, batch).compile(FAST)
  new, m = step(state, batch)
  assert state.params["layers"]["q_kernel"].is_deleted()     # the state was donated

  # Layout: the table's shardings, FSDP/tensor actually splitting the big leaves.
  for got, want in zip(jax.tree.leaves(new), jax.tree.leaves(sh)):
    assert got.sharding.is_equivalent_to(want, got.ndim)
  d, f, t = shape
  q = new.params["layers"]["q_kernel"]                        # [L, D, H, Dh]: (None, fsdp, tensor)
  assert q.addressable_shards[0].data.shape == (2, 32 // f, 4 // t, 8)
  mu, _ = _moments(new)
  assert mu["layers"]["q_kernel"].sharding.is_equivalent_to(q.sharding, 4)
  emb = new.params["embed"]["embedding"]                      # [V, D]: (tensor, fsdp)
  assert emb.addressable_shards[0].data.shape == (24 // t, 32 // f)
  assert new.step.sharding.is_fully_replicated and new.opt_state.notfinite_count.sharding.is_fully_replicated

  ref_state, ref_m = _single(loss, micro)
  new, m = jax.device_get((new, m))
  assert set(m) == set(ref_m)
  for k in ref_m:
    np.testing.assert_allclose(m[k], ref_m[k], rtol=2e-4, atol=1e-6, err_msg=k)
  assert float(ref_m["grad_norm"]) > 1e-3                     # a real update
  for a, b in zip(jax.tree.leaves(_moments(new)), jax.tree.leaves(_moments(ref_state))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-9)
  for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(ref_state.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(new.key, ref_state.key)


# ----------------------------------------------------------------------------- the loop
# The same run as tests/test_multiprocess.py (one definition: in one session the
# two tests share their compiled programs).
BASE = loop_config(name="sharded")


def _train(tmp, name, mesh):
  cfg = C.from_dict(BASE, [f"mesh.data={mesh[0]}", f"mesh.fsdp={mesh[1]}", f"mesh.tensor={mesh[2]}"])
  run_dir = os.path.join(tmp, name)
  return _loop.train(cfg, run_dir, _build.build_components(cfg, run_dir))


def test_train_on_a_2x2x2_mesh_equals_one_device(tmp_path, monkeypatch):
  placed = []
  real = sampler._sampler.place_params

  def spy(cfg, params, mesh):
    out = real(cfg, params, mesh)
    placed.append(all(a is b for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(params))))
    return out

  monkeypatch.setattr(sampler._sampler, "place_params", spy)   # both engines place through it
  one = _train(str(tmp_path), "one", (1, 1, 1))
  assert placed == []                                          # one device: no mesh in the sampler
  mesh = _train(str(tmp_path), "mesh", (2, 2, 2))
  assert placed and all(placed)                                # the sampler read the trainer's arrays
  q = mesh.state.params["layers"]["q_kernel"]
  assert len(q.sharding.device_set) == 8 and q.addressable_shards[0].data.shape == (1, 16, 2, 8)
  timing = {"step_time_s", "sample_time_s", "tokens_per_s"}
  assert [r["step"] for r in mesh.history] == [1]
  for r1, r8 in zip(one.history, mesh.history):
    assert set(r1) == set(r8)
    for k in set(r1) - timing:
      if r1[k] is None:
        assert r8[k] is None, k
      else:
        np.testing.assert_allclose(r8[k], r1[k], rtol=1e-4, atol=1e-6, err_msg=k)
  for a, b in zip(jax.tree.leaves(one.state.params), jax.tree.leaves(mesh.state.params)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- checks at start
def _cfg(**over):
  return C.from_dict(BASE, [f"{k.replace('__', '.')}={v}" for k, v in over.items()])


def test_plan_mesh_numbers_and_errors():
  cfg = _cfg(mesh__data=2, mesh__fsdp=2, mesh__tensor=2)
  assert sharding.plan_mesh(cfg, 8).shape == (2, 2, 2) and sharding.plan_mesh(cfg, 8).note is None
  # 16 rows / 2 mini / 2 micro = 4 rows per micro-batch; data=-1 on 8 devices shrinks to 4
  plan = sharding.plan_mesh(_cfg(train__micro_batches=2), 8)
  assert plan.shape == (4, 1, 1) and "4 of 8 devices" in plan.note
  with pytest.raises(C.ConfigError, match=r"micro-batch of 4 rows .* data x fsdp = 8 x 1 = 8"):
    sharding.plan_mesh(_cfg(mesh__data=8, train__micro_batches=2), 8)
  with pytest.raises(C.ConfigError, match=r"micro-batch of 4 rows"):  # several processes: no shrinking
    sharding.plan_mesh(_cfg(train__micro_batches=2), 8, process_count=2)
  with pytest.raises(C.ConfigError,
                     match=r"data=3 x fsdp=1 x tensor=1 = 3 devices, but 8 .*3 does not divide 8"):
    sharding.plan_mesh(_cfg(mesh__data=3, train__micro_batches=1), 8)
  with pytest.raises(C.ConfigError, match=r"fixed axes use 3 devices, which does not divide the 8"):
    sharding.plan_mesh(_cfg(mesh__tensor=3), 8)
  with pytest.raises(C.ConfigError, match=r"mesh.tensor: 4 does not divide the model's 2 key/value"):
    sharding.plan_mesh(_cfg(mesh__data=2, mesh__tensor=4), 8, model_config=CFG)
  assert (sharding.plan_mesh(_cfg(mesh__data=1), 8).note
          == "mesh data=1 x fsdp=1 x tensor=1 uses the first 1 of 8 devices")


def test_train_rejects_a_batch_that_does_not_split_before_writing(tmp_path):
  cfg = _cfg(mesh__data=8, train__micro_batches=2)
  run_dir = tmp_path / "never"
  comps = _build.build_components(cfg, str(run_dir))
  before = sorted(os.listdir(run_dir))
  with pytest.raises(C.ConfigError, match=r"does not split over data x fsdp = 8 x 1 = 8 devices"):
    _loop.train(cfg, str(run_dir), comps)
  # no config.yaml, metrics, checkpoints; the run-directory lock is released (left empty)
  assert sorted(set(os.listdir(run_dir)) - {"run.lock"}) == before
  assert os.path.getsize(run_dir / "run.lock") == 0


def test_fit_spec_replicates_dims_an_axis_does_not_divide():
  sizes = {"data": 2, "fsdp": 4, "tensor": 2}
  assert sharding.fit_spec((17, 32), P("tensor", "fsdp"), sizes) == P(None, "fsdp")
  assert sharding.fit_spec((8, 6), P(("data", "fsdp"), None), sizes) == P(("data", "fsdp"), None)
  assert sharding.fit_spec((6, 6), P(("data", "fsdp")), sizes) == P(None, None)
  assert sharding.fit_spec((4,), P("pipeline"), sizes) == P(None)
