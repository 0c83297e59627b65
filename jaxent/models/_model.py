"""The decoder as pure functions over a params pytree, and a thin ``Model``.

``params`` is a plain nested dict (shapes with L layers, D embed, V vocab)::

  {"embed": {"embedding": [V, D]},
   "layers": {<Block params, each with a leading [L] axis>},
   "final_norm": {"scale": [D]},
   "lm_head": {"kernel": [D, V]}}          # absent when tie_word_embeddings

The layers are stacked and run with ``lax.scan`` (one compiled layer, fast
compiles), optionally under ``jax.checkpoint`` (``cfg.remat``).
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxent.models._config import ModelConfig
from jaxent.models._layers import Block, RMSNorm, rope_angles
from jaxent.ops import HiddenAndHead
from jaxent.sharding import constrain

Params = dict[str, Any]


class KVCache(NamedTuple):
  """Stacked key/value cache.

  ``k``, ``v``: ``[L, B, S, K, N]`` (layers, batch, slots, kv heads, head_dim);
  ``index``: the next slot to write: an int32 scalar shared by every row
  (ragged prompts are left-padded and the pad slots masked by ``kv_mask``),
  or int32 ``[B]``, one write index per row (the continuous-batching engine's
  slots, each at its own point of its own response).
  """
  k: jax.Array
  v: jax.Array
  index: jax.Array


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> KVCache:
  """An empty cache of ``max_len`` slots (``dtype`` defaults to ``cfg.dtype``)."""
  if batch <= 0 or max_len <= 0:
    raise ValueError(f"init_cache: batch={batch} and max_len={max_len} must be positive")
  dt = cfg.dtype if dtype is None else jnp.dtype(dtype)
  shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
  return KVCache(jnp.zeros(shape, dt), jnp.zeros(shape, dt), jnp.zeros((), jnp.int32))


# ----------------------------------------------------------------------------- axes
_LAYER_AXES = {
    "q_kernel": ("embed", "heads", "head_dim"),
    "k_kernel": ("embed", "kv_heads", "head_dim"),
    "v_kernel": ("embed", "kv_heads", "head_dim"),
    "o_kernel": ("heads", "head_dim", "embed"),
    "q_bias": ("heads", "head_dim"),
    "k_bias": ("kv_heads", "head_dim"),
    "v_bias": ("kv_heads", "head_dim"),
    "o_bias": ("act_embed",),
    "gate_kernel": ("embed", "mlp"),
    "up_kernel": ("embed", "mlp"),
    "down_kernel": ("mlp", "embed"),
    # Norm scales are tiny and read by every shard: replicated.
    "attn_norm": {"scale": ("act_embed",)},
    "mlp_norm": {"scale": ("act_embed",)},
    "q_norm": {"scale": ("head_dim",)},
    "k_norm": {"scale": ("head_dim",)},
}


def param_logical_axes(cfg: ModelConfig) -> Params:
  """Logical axis names of every parameter: a pytree of tuples matching ``params``.

  Map to mesh axes with ``jaxent.sharding.logical_to_spec`` / ``named_sharding``.
  Stacked layer parameters lead with ``"layers"``. Small vectors (norm scales,
  the o bias) use ``act_embed`` / ``head_dim``, which the table replicates.
  """
  shapes = _param_struct(cfg)
  out: Params = {"embed": {"embedding": ("vocab", "embed")},
                 "final_norm": {"scale": ("act_embed",)},
                 "layers": {}}
  for name in shapes["layers"]:
    ax = _LAYER_AXES[name]
    out["layers"][name] = ({"scale": ("layers",) + ax["scale"]} if isinstance(ax, dict)
                           else ("layers",) + ax)
  if "lm_head" in shapes:
    out["lm_head"] = {"kernel": ("embed", "vocab")}
  return out


def cache_logical_axes(cfg: ModelConfig) -> KVCache:
  """Logical axes of a ``KVCache`` (a ``KVCache`` of tuples)."""
  del cfg
  kv = ("layers", "batch", "cache_seq", "kv_heads", "head_dim")
  return KVCache(kv, kv, ())


# ----------------------------------------------------------------------------- init
def _param_struct(cfg: ModelConfig) -> Params:
  """Shapes/dtypes of every parameter, from the linen ``Block`` (traced, not run)."""
  d, v, pdt = cfg.hidden_size, cfg.vocab_size, cfg.param_dtype
  x = jax.ShapeDtypeStruct((1, 1, d), cfg.dtype)
  cs = jax.ShapeDtypeStruct((1, 1, cfg.head_dim // 2), jnp.float32)
  mask = jax.ShapeDtypeStruct((1, 1, 1), bool)
  layer = jax.eval_shape(lambda k, *a: Block(cfg).init(k, *a)["params"],
                         jax.random.key(0), x, cs, cs, mask)
  stack = lambda s: jax.ShapeDtypeStruct((cfg.num_layers,) + s.shape, s.dtype)  # noqa: E731
  struct = {"embed": {"embedding": jax.ShapeDtypeStruct((v, d), pdt)},
            "layers": jax.tree.map(stack, layer),
            "final_norm": {"scale": jax.ShapeDtypeStruct((d,), pdt)}}
  if not cfg.tie_word_embeddings:
    struct["lm_head"] = {"kernel": jax.ShapeDtypeStruct((d, v), pdt)}
  return struct


def param_shapes(cfg: ModelConfig) -> Params:
  """``jax.ShapeDtypeStruct`` of every parameter (no allocation)."""
  return _param_struct(cfg)


def init_params(cfg: ModelConfig, key: jax.Array) -> Params:
  """Random parameters as HF initializes them: matrices ~ N(0, initializer_range^2),
  norm scales 1, biases 0. Pure; jit it (``cfg`` static) to init on device.

  The matrices are cut from ONE normal draw: XLA:CPU compiles each threefry
  call separately (~0.4 s each), so per-leaf draws made a 2-layer model's
  init take ~8 s to compile; one draw takes ~0.5 s. Peak memory is twice
  the matrices' size.
  """
  struct = _param_struct(cfg)
  flat, treedef = jax.tree_util.tree_flatten_with_path(struct)
  names = ["/".join(str(getattr(k, "key", k)) for k in path) for path, _ in flat]
  is_matrix = [not (n.endswith("scale") or n.endswith("bias")) for n in names]
  sizes = [s.size for (_, s), m in zip(flat, is_matrix) if m]
  draw = cfg.initializer_range * jax.random.normal(key, (sum(sizes),), jnp.float32)
  leaves, offset = [], 0
  for (_, s), name, m in zip(flat, names, is_matrix):
    if m:
      leaves.append(draw[offset:offset + s.size].reshape(s.shape).astype(s.dtype))
      offset += s.size
    else:
      leaves.append((jnp.ones if name.endswith("scale") else jnp.zeros)(s.shape, s.dtype))
  return jax.tree_util.tree_unflatten(treedef, leaves)


# ----------------------------------------------------------------------------- forward
def default_positions(tokens: jax.Array, attention_mask: jax.Array | None = None,
                      offset=0) -> jax.Array:
  """RoPE positions: ``offset + t``, or the count of real tokens before ``t``.

  With a mask, a left-padded row's first real token gets position 0, so it
  is encoded exactly as the unpadded row (pad tokens get position 0 too).
  """
  b, t = tokens.shape
  if attention_mask is None:
    return jnp.broadcast_to(offset + jnp.arange(t, dtype=jnp.int32), (b, t))
  m = attention_mask.astype(jnp.int32)
  return offset + jnp.maximum(jnp.cumsum(m, axis=1) - 1, 0)


def _head_kernel(cfg: ModelConfig, params: Params) -> jax.Array:
  if cfg.tie_word_embeddings:
    return params["embed"]["embedding"].T
  return params["lm_head"]["kernel"]


def apply(cfg: ModelConfig, params: Params, tokens: jax.Array, positions: jax.Array | None = None,
          *, attention_mask: jax.Array | None = None, cache: KVCache | None = None,
          kv_mask: jax.Array | None = None, return_hidden: bool = False):
  """Forward pass; pure and jit-able with ``cfg`` (and ``return_hidden``) static.

  Without a cache the keys are the ``T`` input tokens: query ``t`` sees key
  ``s`` iff ``s <= t`` and ``attention_mask[b, s]``. With a cache of ``S``
  slots and write index ``i``, the new keys/values go to slots ``i..i+T-1``
  and query ``t`` (slot ``i+t``) sees slot ``s`` iff ``s <= i+t`` and
  ``kv_mask[b, s]`` (and, if given, ``attention_mask[b, s-i]`` for the new
  slots). The caller keeps ``i + T <= S``: ``dynamic_update_slice`` would
  clamp the write (checked eagerly, not under jit).

  Args:
    cfg: static model config.
    params: parameter pytree (see module docstring).
    tokens: int32 ``[B, T]``.
    positions: int32 ``[B, T]`` RoPE positions; None: ``default_positions``
      (``index + t`` with a cache).
    attention_mask: ``[B, T]``, 1/True for real tokens.
    cache: a ``KVCache`` or None.
    kv_mask: bool ``[B, S]``, valid cache slots (cache only; None: all).
    return_hidden: return ``HiddenAndHead(hidden [B, T, D], kernel [D, V])`` (final-norm
      hidden states and unembedding, compute dtype) instead of logits, so a
      loss can form log-probs chunk by chunk without ``[B, T, V]``.

  Returns:
    ``(logits float32 [B, T, V] | HiddenAndHead, cache)``; ``cache`` is the
    updated ``KVCache`` (``index + T``) or None.
  """
  if tokens.ndim != 2:
    raise ValueError(f"tokens must be [batch, time], got shape {tokens.shape}")
  b, t = tokens.shape
  for name, arr in (("positions", positions), ("attention_mask", attention_mask)):
    if arr is not None and arr.shape != (b, t):
      raise ValueError(f"{name} must have the shape of tokens {(b, t)}, got {arr.shape}")
  dt = cfg.dtype
  if cache is None:
    if kv_mask is not None:
      raise ValueError("kv_mask is only used with a cache; pass attention_mask instead")
    if positions is None:
      positions = default_positions(tokens, attention_mask)
    causal = jnp.arange(t)[None, :] <= jnp.arange(t)[:, None]  # [T, S=T]
    mask = causal[None] if attention_mask is None else (
        causal[None] & attention_mask.astype(bool)[:, None, :])
    kv, index = None, None
  else:
    lc, bc, s = cache.k.shape[:3]
    if (lc, bc) != (cfg.num_layers, b):
      raise ValueError(f"cache has {lc} layers x batch {bc}; expected "
                       f"{cfg.num_layers} x {b}")
    index = jnp.asarray(cache.index, jnp.int32)
    if index.ndim not in (0, 1) or (index.ndim == 1 and index.shape != (b,)):
      raise ValueError(f"cache.index must be a scalar or [batch] = [{b}], got {index.shape}")
    if not isinstance(index, jax.core.Tracer) and int(jnp.max(index)) + t > s:
      raise ValueError(f"cache overflow: index {int(jnp.max(index))} + {t} new tokens > {s} slots")
    # Per-row indices: row b's query t sits at slot index[b] + t.
    row_index = index[:, None] if index.ndim else index
    if positions is None:
      positions = default_positions(tokens, None, offset=row_index)
    valid = jnp.ones((b, s), bool) if kv_mask is None else kv_mask.astype(bool)
    if kv_mask is not None and kv_mask.shape != (b, s):
      raise ValueError(f"kv_mask must be [batch, slots] = {(b, s)}, got {kv_mask.shape}")
    if attention_mask is not None:
      if index.ndim:
        raise ValueError("attention_mask with per-row cache indices is not supported; "
                         "mask the slots with kv_mask")
      valid = valid & lax.dynamic_update_slice(jnp.ones((b, s), bool),
                                               attention_mask.astype(bool), (0, index))
    if index.ndim:
      causal = jnp.arange(s)[None, None, :] <= (index[:, None] + jnp.arange(t))[:, :, None]
      mask = causal & valid[:, None, :]  # [B, T, S]
    else:
      causal = jnp.arange(s)[None, :] <= index + jnp.arange(t)[:, None]  # [T, S]
      mask = causal[None] & valid[:, None, :]
    kv = (cache.k, cache.v)

  # The table's rows stay split over "vocab" but its columns are gathered first
  # (one all-gather over fsdp, like every layer's weights): a lookup from an
  # embed-sharded table yields embed-sharded rows, which XLA can only turn into
  # batch-sharded activations by replicating the whole [B, T, D] on every device.
  table = constrain(params["embed"]["embedding"], ("vocab", None))
  x = jnp.take(table, tokens, axis=0).astype(dt)
  x = constrain(x, ("batch", "seq", "act_embed"))
  cos, sin = rope_angles(cfg, positions)
  block = Block(cfg)

  def layer(carry, p):
    x, kv, i = carry
    x, kv = block.apply({"params": p}, x, cos, sin, mask, kv, i, index)
    return (x, kv, i + 1), None

  if cfg.remat:
    layer = jax.checkpoint(layer, prevent_cse=False)
  # A shallow stack is unrolled: on CPU the backward pass of a rolled scan
  # costs about twice as much (measured on the demo model); deep stacks stay
  # rolled for compile time.
  unroll = cfg.num_layers if cfg.num_layers <= 4 else 1
  (x, kv, _), _ = lax.scan(layer, (x, kv, jnp.zeros((), jnp.int32)), params["layers"], unroll=unroll)
  h = RMSNorm(cfg.rms_norm_eps, dt, cfg.param_dtype).apply(
      {"params": params["final_norm"]}, x)
  new_cache = None if cache is None else KVCache(kv[0], kv[1], index + t)
  kernel = _head_kernel(cfg, params).astype(dt)
  if return_hidden:
    return HiddenAndHead(h, kernel), new_cache
  # Logits accumulate in float32: log-softmax over a large vocabulary in
  # bfloat16 would lose the small probabilities the losses need.
  logits = jnp.einsum("BTD,DV->BTV", h, kernel, preferred_element_type=jnp.float32)
  return constrain(logits, ("batch", "seq", "vocab")), new_cache


_apply_jit = jax.jit(apply, static_argnums=(0,), static_argnames=("return_hidden",))


# ----------------------------------------------------------------------------- Model
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Model:
  """A config and its parameters; a pytree (``params`` traced, ``config`` static)."""
  params: Params
  config: ModelConfig = dataclasses.field(metadata=dict(static=True))

  def __call__(self, tokens, positions=None, *, attention_mask=None) -> jax.Array:
    """Logits float32 ``[B, T, V]`` for int32 tokens ``[B, T]`` (jitted)."""
    tokens = jnp.asarray(tokens, jnp.int32)
    if positions is not None:
      positions = jnp.asarray(positions, jnp.int32)
    if attention_mask is not None:
      attention_mask = jnp.asarray(attention_mask)
    logits, _ = _apply_jit(self.config, self.params, tokens, positions,
                           attention_mask=attention_mask)
    return logits

  def apply(self, tokens, positions=None, **kw):
    """``models.apply(self.config, self.params, ...)`` (jitted)."""
    return _apply_jit(self.config, self.params, tokens, positions, **kw)

  def replace(self, **changes) -> "Model":
    return dataclasses.replace(self, **changes)

  def __repr__(self) -> str:  # the default would print every parameter
    c = self.config
    return (f"Model({c.model_type}, layers={c.num_layers}, hidden={c.hidden_size}, "
            f"vocab={c.vocab_size}, params={self.num_params:,}, param_dtype={c.param_dtype})")

  @property
  def num_params(self) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(self.params))


def init_model(cfg: ModelConfig, seed: int = 0) -> Model:
  """A model with random parameters from a config alone (see ``init_params``)."""
  params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(seed))
  return Model(params=params, config=cfg)
