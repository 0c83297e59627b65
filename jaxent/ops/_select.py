"""Fixed-shape top-k selection with a traced count, local and mesh-wide.

The covariance losses choose a data-dependent number of tokens,
``max(1, floor(ratio * N))`` with ``N`` the number of valid tokens. Shapes must
stay static, so the count is a traced scalar compared against ranks produced
by a ``lax.top_k`` of static size ``k_max``; the count never becomes a shape.

On a device mesh whose batch axes have more than one device, the top-k is
two-stage (``shard_map``): each shard takes its local top-k, the shards
exchange only those ``k`` candidates, and a final top-k picks the global
winners. The result is identical to the single-device one, and the traffic is
``devices * k`` elements, never the token array.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

# Mesh axes that shard the batch (row) dimension of [B, T] token arrays.
from jaxent.types import BATCH_AXES

# A traced ratio is float32: ratio * N is formed in float32 (N split so each
# part is exact), and a decimal ratio such as 2e-4 is not exact in float32
# (2e-4 -> 1.99999995e-4), so 2e-4 * 15000 would floor to 2 instead of the
# reference's 3. Products within this relative distance below an integer
# snap up to it (float32 rounding of the ratio and of the product stay
# inside it). A concrete Python ratio needs no such rule: see _thresholds.
_SNAP_REL = 2.0**-22
# Above this many distinct counts the threshold table would be large; the
# float32 rule is used instead.
_MAX_THRESHOLDS = 1 << 18


def _is_concrete(x) -> bool:
  return isinstance(x, (int, float, np.integer, np.floating))


def _reference_count(ratio: float, n: int) -> int:
  """The reference's count, ``int(ratio * n)`` in double precision, at least 1."""
  return max(1, int(float(ratio) * int(n)))


def _thresholds(ratio: float, max_n: int) -> np.ndarray | None:
  """``T[c-1] = min{N : floor(fl64(ratio*N)) >= c}`` for ``c = 1 .. count(max_n)``.

  ``fl64(ratio*N)`` is monotone in ``N``, so the reference's count for ``N``
  tokens is ``#{c : T[c-1] <= N}`` (at least 1): an exact double-precision
  rule evaluated on the host once, then compared on device with int32s.
  """
  r = float(ratio)
  k = int(r * max_n)
  if k > _MAX_THRESHOLDS:
    return None
  c = np.arange(1, k + 1, dtype=np.float64)
  n0 = np.ceil(c / r).astype(np.int64)
  cand = n0[:, None] + np.arange(-3, 4)[None, :]
  ok = np.floor(r * cand.astype(np.float64)) >= c[:, None]   # numpy float64: IEEE double like Python
  first = np.argmax(ok, axis=1)
  if k and not ok[np.arange(k), first].all():  # pragma: no cover - would need |error| > 3 tokens
    return None
  return cand[np.arange(k), first].astype(np.int64)


def selection_count(ratio, n_valid, *, max_n: int | None = None) -> jax.Array:
  """``max(1, floor(ratio * n_valid))`` as a traced int32 scalar.

  With a concrete Python ``ratio`` and the static bound ``max_n >= n_valid``
  (e.g. ``B*T``), the count is exactly the reference's double-precision
  ``int(ratio * N)``. A traced ``ratio`` is float32 and uses a snap-up rule
  that reproduces it for decimal ratios (see ``_SNAP_REL``).

  Args:
    ratio: selection ratio in (0, 1]; a Python float or a traced scalar.
    n_valid: number of valid tokens (traced int scalar).
    max_n: static upper bound on ``n_valid``.
  """
  n = jnp.asarray(n_valid, jnp.int32)
  if _is_concrete(ratio) and max_n is not None:
    t = _thresholds(float(ratio), int(max_n))
    if t is not None:
      if len(t) == 0:
        return jnp.ones((), jnp.int32)
      return jnp.maximum(jnp.sum(jnp.asarray(t, jnp.int32) <= n, dtype=jnp.int32), 1)
  # Split n so that each part is exact in float32 even beyond 2**24 tokens.
  hi = (n >> 12).astype(jnp.float32) * 4096.0
  lo = (n & 4095).astype(jnp.float32)
  r = jnp.asarray(ratio, jnp.float32)
  x = r * hi + r * lo
  k = jnp.floor(x)
  k = jnp.where(k + 1.0 - x <= x * _SNAP_REL, k + 1.0, k)
  return jnp.maximum(k.astype(jnp.int32), 1)


def static_count_bound(ratio: float, size: int) -> int:
  """Static upper bound on ``selection_count(ratio, n)`` for ``n <= size``.

  The reference count at ``size`` (monotone in n), or one more when the
  float32 snap rule could round up there.
  """
  k = _reference_count(ratio, size)
  x = float(ratio) * int(size)
  if int(x) + 1 - x <= x * _SNAP_REL * 4:
    k += 1
  return max(1, min(k, int(size)))


def top_k_mask(scores: jax.Array, valid: jax.Array, count, *, k_max: int,
               mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
               batch_axes: tuple[str, ...] = BATCH_AXES) -> jax.Array:
  """Boolean mask of the ``count`` highest ``scores`` among ``valid`` entries.

  Ranks follow ``lax.top_k`` over the flat (row-major) array with invalid
  entries set to ``-inf``: higher score first, ties broken by position (the
  lower flat index wins); ``-0.0`` ties with ``+0.0``, and a NaN score counts
  as ``-inf``. The first ``min(count, k_max)`` ranks are chosen and
  then restricted to valid entries, so at most ``min(count, k_max, sum(valid))``
  entries are set. The top-k itself is block-pruned (``_top_k_exact``): one
  pass of block maxima, then two small ``top_k``s; the result is identical to
  a ``lax.top_k`` of the whole array.

  On a mesh (``mesh=``, else the one set by ``jax.set_mesh``) whose
  ``batch_axes`` hold ``D > 1`` devices, dimension 0 is sharded over those
  axes and the selection is two-stage: shard ``d`` takes the top
  ``k_loc = min(k_max, B*T/D)`` of its rows with their global flat indices;
  an all-gather over the batch axes exchanges those ``D * k_loc`` candidates
  (shard order = row order, so equal scores stay in global index order); a
  final top-``k_max`` picks the global winners, and each shard sets the
  winners that fall in its rows. Every global top-``k_max`` entry is in its
  shard's top-``k_loc``, so the result is identical to the single-device one;
  the output stays sharded like the input.

  Args:
    scores: float ``[B, T]``; values at invalid positions are ignored (they
      may be NaN or inf).
    valid: bool ``[B, T]``.
    count: traced int scalar, the number to select.
    k_max: static bound on ``count``; the size of the top-k.
    mesh: the mesh to select over; default: the mesh set by ``jax.set_mesh``
      (none: single-device path).
    batch_axes: mesh axes that shard dimension 0; names absent from the mesh
      (or manual there, inside a caller's ``shard_map``) are ignored.

  Returns:
    bool ``[B, T]``.

  Raises:
    ValueError: if ``scores`` and ``valid`` differ in shape, or on a mesh if
      ``B`` is not divisible by the number of batch-axis devices.
  """
  if scores.shape != valid.shape:
    raise ValueError(f"top_k_mask: scores shape {scores.shape} != valid shape {valid.shape}")
  k_max = int(min(max(k_max, 1), scores.size))
  if mesh is None:
    mesh = jax.sharding.get_abstract_mesh()
  axes = _active_batch_axes(mesh, batch_axes)
  n_shards = 1
  for a in axes:
    n_shards *= mesh.shape[a]
  # Explicit-typed meshes (jax.make_mesh's default) also take the shard_map
  # path at one batch shard: there a plain top_k of an array typed as sharded
  # over size-1 axes is a sharding-type error.
  explicit = any(t == jax.sharding.AxisType.Explicit for t in getattr(mesh, "axis_types", ()))
  if scores.ndim == 0 or not axes or (n_shards == 1 and not explicit):
    return _top_k_mask_single(scores, valid, count, k_max)
  if scores.shape[0] % n_shards:
    sizes = " x ".join(f"{a}={mesh.shape[a]}" for a in axes)
    raise ValueError(f"top_k_mask: batch size B={scores.shape[0]} (scores shape {scores.shape}) "
                     f"is not divisible by the {n_shards} devices of the batch mesh axes "
                     f"({sizes})")
  if explicit:
    # Explicit-typed inputs must already carry the specs shard_map is given.
    spec = P(axes, *([None] * (scores.ndim - 1)))
    scores = jax.sharding.reshard(scores, spec)
    valid = jax.sharding.reshard(valid, spec)
  return _top_k_mask_sharded(scores, valid, count, k_max, mesh, axes, n_shards)


def _active_batch_axes(mesh, batch_axes) -> tuple[str, ...]:
  if mesh is None or mesh.empty:
    return ()
  if isinstance(batch_axes, str):
    batch_axes = (batch_axes,)
  manual = set(getattr(mesh, "manual_axes", ()) or ())
  return tuple(a for a in batch_axes if a in mesh.axis_names and a not in manual)


def _canonical(scores, valid):
  """float32 scores ranked by ``lax.top_k``'s total order exactly as documented.

  Invalid entries and NaN become ``-inf``; ``-0.0`` becomes ``+0.0``
  (``top_k`` orders ``-0 < +0``, but equal scores must tie and go to the lower
  index). No NaN is left: ``top_k`` orders NaNs by sign, and XLA:CPU's
  ``max`` reduction skips them, so a block maximum would not see them.
  """
  s = scores.astype(jnp.float32)
  s = jnp.where(s == 0, jnp.float32(0), s)
  return jnp.where(valid & ~jnp.isnan(s), s, -jnp.inf)


# Block sizes, powers of two: XLA:CPU's max over rows shorter than 32 is slow
# (measured), and blocks below 8 do not pay for the extra top-k and gather.
_MIN_BLOCK = 8
_PREFERRED_MIN_BLOCK = 32


def _block_size(n: int, k: int) -> int:
  """Block size for ``_top_k_exact``; 1 means "no blocking".

  About ``sqrt(n / k)`` (at least 32), which balances the two small top-ks (one
  over ``n / c`` block maxima, one over ``k * c`` candidates), reduced to the
  largest power of two dividing ``n``.
  """
  target = max(_PREFERRED_MIN_BLOCK, 2 ** round(math.log2(math.sqrt(n / max(k, 1)))))
  c = 1
  while n % (2 * c) == 0 and 2 * c <= target:
    c *= 2
  if c < _MIN_BLOCK or k * c >= n:
    return 1
  return c


def _top_k_exact(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """``lax.top_k(x, k)`` of a canonical 1-D float32 array, exactly, at a fraction of its cost.

  XLA:CPU's ``TopK`` is a partial sort over an index array as long as ``x``
  (about one PPO-clip value-and-grad at a million tokens). Instead: split
  ``x`` into ``n / c`` contiguous blocks of ``c``, take each block's maximum
  (one vectorised pass), the top ``k`` blocks by maximum (ties: lower block
  first, i.e. ``top_k``'s order of the blocks' best elements), and the top
  ``k`` of those blocks' ``k * c`` entries, gathered in flat order.

  Exact, same values, indices and order as ``lax.top_k``: order entries by
  (value desc, index asc) and blocks by their best entry. Each block ranked
  above the block of a top-``k`` entry ``e`` has a best entry ranked above
  ``e``, a different one per block, so fewer than ``k`` blocks rank above
  it: every top-``k`` entry lies in the top ``k`` blocks. Gathered in
  ascending block order, the candidates keep flat order, so the final
  ``top_k``'s positional tie-break is the flat-index one.

  Returns:
    ``(values [k], indices [k] int32)``.
  """
  n = x.shape[0]
  c = _block_size(n, k)
  if c == 1:
    return lax.top_k(x, k)
  blocks = x.reshape(n // c, c)
  best = jnp.max(blocks, axis=1)
  _, b = lax.top_k(best, min(k, n // c))
  b = jnp.sort(b)
  vals, pos = lax.top_k(blocks[b].reshape(-1), k)
  return vals, b[pos // c] * c + pos % c


def _top_k_mask_single(scores, valid, count, k_max, top_k=_top_k_exact):
  """Single-device ``top_k_mask``: block-pruned exact top-k, then a scatter."""
  shape = scores.shape
  flat = _canonical(scores, valid).reshape(-1)
  v = valid.reshape(-1)
  _, idx = top_k(flat, k_max)
  keep = (jnp.arange(k_max) < count) & v[idx]
  sel = jnp.zeros(flat.shape, bool).at[idx].set(keep, mode="drop")
  return sel.reshape(shape)


def _top_k_mask_local(scores, valid, count, k_max):
  """The same with one flat ``lax.top_k``: the reference the fast path equals.

  Kept for tests and for bench/selection.py's one-stage (GSPMD) comparison.
  """
  return _top_k_mask_single(scores, valid, count, k_max, top_k=lax.top_k)


def _top_k_mask_sharded(scores, valid, count, k_max, mesh, axes, n_shards):
  local_n = scores.size // n_shards
  k_loc = min(k_max, local_n)
  spec = P(axes, *([None] * (scores.ndim - 1)))

  def shard_fn(s, v, c):
    flat = _canonical(s, v).reshape(-1)
    vflat = v.reshape(-1)
    vals, idx = _top_k_exact(flat, k_loc)
    # Rows are laid out shard after shard along the linearised batch axes, so
    # this shard's first flat index is its linear index times local_n.
    offset = lax.axis_index(axes) * local_n
    # Tiled all-gather in the same linear order: candidates arrive sorted by
    # shard, i.e. equal scores stay in ascending global index, and the final
    # top_k's positional tie-break equals the single-device one.
    all_vals = lax.all_gather(vals, axes, tiled=True)   # [D * k_loc]
    all_idx = lax.all_gather(idx + offset, axes, tiled=True)
    _, pos = lax.top_k(all_vals, k_max)
    local = all_idx[pos] - offset                       # [k_max]
    here = (local >= 0) & (local < local_n)
    local = jnp.where(here, local, local_n)             # out of range: dropped
    keep = (jnp.arange(k_max) < c) & here & vflat[jnp.minimum(local, local_n - 1)]
    sel = jnp.zeros((local_n,), bool).at[local].set(keep, mode="drop")
    return sel.reshape(s.shape)

  count = jnp.asarray(count, jnp.int32)
  return jax.shard_map(shard_fn, mesh=mesh, in_specs=(spec, spec, P()),
                       out_specs=spec)(scores, valid, count)
