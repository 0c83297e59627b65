"""One decoder layer (flax linen) and the RoPE / mask helpers.

Dimension letters in einsum strings: B batch, T query time, S key slots,
D embed, H query heads, K key/value heads, G = H // K queries per kv head,
N head_dim, F mlp width.

Parameter layouts (per layer; the stack adds a leading ``layers`` axis):

  q_kernel [D, H, N]   k_kernel, v_kernel [D, K, N]   o_kernel [H, N, D]
  q_bias [H, N]        k_bias, v_bias [K, N]           o_bias [D]
  gate_kernel, up_kernel [D, F]   down_kernel [F, D]
  attn_norm, mlp_norm: {scale [D]}   q_norm, k_norm: {scale [N]} (Qwen3)
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxent.models._attention import attention, cached_attention
from jaxent.models._config import ModelConfig
from jaxent.sharding import constrain

def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
  """Inverse frequencies ``theta^(-2i/N)``, i < N/2, float32, with HF's scalings.

  Computed as transformers computes them (float32 throughout), so positions
  map to the same angles: ``default``; ``linear`` divides by ``factor``;
  ``llama3`` divides low frequencies by ``factor`` and interpolates the band
  between ``original_max_position_embeddings / high_freq_factor`` and
  ``/ low_freq_factor`` wavelengths.
  """
  n = cfg.head_dim
  inv = (1.0 / (np.float32(cfg.rope_theta) **
                (np.arange(0, n, 2, dtype=np.int64).astype(np.float32) / np.float32(n))))
  inv = inv.astype(np.float32)
  rs = cfg.rope_scaling
  if rs is None:
    return inv
  factor = np.float32(rs["factor"])
  if rs["rope_type"] == "linear":
    return (inv / factor).astype(np.float32)
  # llama3
  low, high = np.float32(rs["low_freq_factor"]), np.float32(rs["high_freq_factor"])
  old = np.float32(rs["original_max_position_embeddings"])
  low_wl, high_wl = old / low, old / high
  wl = np.float32(2 * np.pi) / inv
  out = np.where(wl > low_wl, inv / factor, inv)
  smooth = (old / wl - low) / (high - low)
  smoothed = (1 - smooth) * out / factor + smooth * out
  medium = ~(wl < high_wl) & ~(wl > low_wl)
  return np.where(medium, smoothed, out).astype(np.float32)


def rope_angles(cfg: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(cos, sin)`` of ``positions[b, t] * inv_freq[i]``, float32 ``[B, T, N/2]``."""
  ang = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_inv_freq(cfg))
  return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """RoPE in HF's ``rotate_half`` convention on ``x [B, T, heads, N]``.

  Pairs dimension ``i`` with ``i + N/2`` (not ``2i`` with ``2i+1``)::

    x1' = x1 cos - x2 sin,   x2' = x2 cos + x1 sin,   x = [x1 | x2]

  HF checkpoints store q/k projections already permuted for this
  convention, so their weights map onto ours without any permutation.
  """
  dt = x.dtype
  x = x.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  c, s = cos[:, :, None, :], sin[:, :, None, :]
  return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(dt)


class RMSNorm(nn.Module):
  """``y = scale * x / sqrt(mean(x^2) + eps)``, statistics in float32 (as HF)."""
  eps: float
  dtype: jnp.dtype
  param_dtype: jnp.dtype

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
    xf = x.astype(jnp.float32)
    y = xf * lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    # HF casts the normalized value back to the input dtype before the scale.
    return scale.astype(self.dtype) * y.astype(self.dtype)


class Block(nn.Module):
  """Pre-norm decoder layer: grouped-query attention with RoPE, then SwiGLU."""
  cfg: ModelConfig

  def _p(self, name, shape, init):
    return self.param(name, init, shape, self.cfg.param_dtype)

  @nn.compact
  def __call__(self, x, cos, sin, mask, kv=None, layer=None, index=None):
    """One layer.

    Args:
      x: ``[B, T, D]`` residual stream (compute dtype).
      cos, sin: ``[B, T, N/2]`` float32 RoPE angles.
      mask: bool ``[B, T, S]``, True where query t may attend key slot s.
      kv: None (keys are the T new tokens, S = T) or the whole stacked cache
        ``(k, v)``, each ``[L, B, S, K, N]``; the new keys/values are written
        at ``[layer, :, index:index+T]``.
      layer: int32 scalar (only with ``kv``).
      index: int32 scalar, or int32 ``[B]`` (one write index per row); only with ``kv``.

    Returns:
      ``(x, kv)`` with ``kv`` updated (or None).
    """
    cfg = self.cfg
    dt = cfg.dtype
    d, h, k, n, f = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                     cfg.intermediate_size)
    w_init = nn.initializers.normal(cfg.initializer_range)
    zeros = nn.initializers.zeros
    norm = lambda name: RMSNorm(cfg.rms_norm_eps, dt, cfg.param_dtype, name=name)  # noqa: E731

    # --- attention
    y = norm("attn_norm")(x)

    wq = self._p("q_kernel", (d, h, n), w_init)
    q = jnp.einsum("BTD,DHN->BTHN", y, wq.astype(dt))
    wk = self._p("k_kernel", (d, k, n), w_init)
    kk = jnp.einsum("BTD,DKN->BTKN", y, wk.astype(dt))
    wv = self._p("v_kernel", (d, k, n), w_init)
    vv = jnp.einsum("BTD,DKN->BTKN", y, wv.astype(dt))
    if cfg.qkv_bias:
      q = q + self._p("q_bias", (h, n), zeros).astype(dt)
      kk = kk + self._p("k_bias", (k, n), zeros).astype(dt)
      vv = vv + self._p("v_bias", (k, n), zeros).astype(dt)
    if cfg.qk_norm:
      q = norm("q_norm")(q)
      kk = norm("k_norm")(kk)
    q = constrain(apply_rope(q, cos, sin), ("batch", "seq", "heads", "head_dim"))
    kk = constrain(apply_rope(kk, cos, sin), ("batch", "seq", "kv_heads", "head_dim"))
    vv = constrain(vv, ("batch", "seq", "kv_heads", "head_dim"))
    if kv is not None:
      ck, cv = kv
      t = q.shape[1]
      if jnp.ndim(index) == 0:
        ck = lax.dynamic_update_slice(ck, kk[None].astype(ck.dtype), (layer, 0, index, 0, 0))
        cv = lax.dynamic_update_slice(cv, vv[None].astype(cv.dtype), (layer, 0, index, 0, 0))
        live = index + t
      else:
        # One write index per row: row b's new keys go to slots index[b] + 0..T-1
        # (a scatter; writes past the last slot are dropped).
        rows = jnp.arange(ck.shape[1])[:, None]
        cols = index[:, None] + jnp.arange(t)[None, :]
        ck = ck.at[layer, rows, cols].set(kk.astype(ck.dtype), mode="drop")
        cv = cv.at[layer, rows, cols].set(vv.astype(cv.dtype), mode="drop")
        live = jnp.max(index) + t
      kv = (ck, cv)
      # Only the written prefix of the cache (slots < index + T, in a few static
      # lengths) is read: the rest has probability 0.
      att = cached_attention(q, ck, cv, layer, mask, live, q_chunk=cfg.attention_chunk)
    else:
      # Whole [B, K, G, T, S] scores, or queries cfg.attention_chunk at a time when
      # T exceeds it (same numbers, q_chunk x S memory).
      att = attention(q, kk, vv, mask, q_chunk=cfg.attention_chunk)
    att = constrain(att, ("batch", "seq", "heads", "head_dim"))
    wo = self._p("o_kernel", (h, n, d), w_init)
    out = jnp.einsum("BTHN,HND->BTD", att, wo.astype(dt))
    if cfg.o_bias:
      out = out + self._p("o_bias", (d,), zeros).astype(dt)
    x = constrain(x + out, ("batch", "seq", "act_embed"))

    # --- SwiGLU MLP
    y = norm("mlp_norm")(x)
    gate = jnp.einsum("BTD,DF->BTF", y, self._p("gate_kernel", (d, f), w_init).astype(dt))
    up = jnp.einsum("BTD,DF->BTF", y, self._p("up_kernel", (d, f), w_init).astype(dt))
    hid = constrain(jax.nn.silu(gate) * up, ("batch", "seq", "mlp"))
    down = jnp.einsum("BTF,FD->BTD", hid, self._p("down_kernel", (f, d), w_init).astype(dt))
    x = constrain(x + down, ("batch", "seq", "act_embed"))
    return x, kv
