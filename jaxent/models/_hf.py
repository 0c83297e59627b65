"""Hugging Face checkpoint import and export (local directories, safetensors only).

Tensor mapping (HF ``nn.Linear`` weights are ``[out, in]``; ours ``[in, ...]``),
``i`` the layer, stacked along our leading ``layers`` axis:

  model.embed_tokens.weight [V, D]              -> embed.embedding [V, D]
  model.layers.i.self_attn.q_proj.weight [H*N, D] -> layers.q_kernel[i] [D, H, N]
  model.layers.i.self_attn.{k,v}_proj.weight      -> layers.{k,v}_kernel[i] [D, K, N]
  model.layers.i.self_attn.{q,k,v}_proj.bias      -> layers.{q,k,v}_bias[i] [H|K, N]
  model.layers.i.self_attn.o_proj.weight [D, H*N] -> layers.o_kernel[i] [H, N, D]
  model.layers.i.self_attn.{q,k}_norm.weight [N]  -> layers.{q,k}_norm.scale[i]
  model.layers.i.{input,post_attention}_layernorm  -> layers.{attn,mlp}_norm.scale[i]
  model.layers.i.mlp.{gate,up}_proj.weight [F, D] -> layers.{gate,up}_kernel[i] [D, F]
  model.layers.i.mlp.down_proj.weight [D, F]      -> layers.down_kernel[i] [F, D]
  model.norm.weight                               -> final_norm.scale
  lm_head.weight [V, D]                           -> lm_head.kernel [D, V] (untied only)

No RoPE permutation is needed: HF's q/k weights are already laid out for its
``rotate_half`` convention, which ``apply_rope`` implements.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Sharding

from jaxent.files import open_regular, require_regular, require_regular_entries
from jaxent.models._config import SUPPORTED_MODEL_TYPES, ModelConfig
from jaxent.models._layout import param_shardings
from jaxent.models._model import Model, param_shapes

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Buffers some exporters write that carry no parameters.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class _Conv:
  """An HF tensor <-> one of our (per-layer) leaves, as a split reshape + transpose.

  Each HF dimension ``i`` is split (row-major) into the dimensions
  ``groups[i]`` (a view, no data movement); ours is that view transposed by
  ``perm``: ``ours = hf.reshape(view).transpose(perm)``. Because the reshape
  only splits dimensions, a box of ours is a box of the view, which is a few
  contiguous row ranges of the HF tensor: a slice of ours is read as slices.
  """
  groups: tuple[tuple[int, ...], ...]
  perm: tuple[int, ...]

  @property
  def hf_shape(self) -> tuple[int, ...]:
    return tuple(math.prod(g) for g in self.groups)

  @property
  def view(self) -> tuple[int, ...]:
    return tuple(s for g in self.groups for s in g)

  @property
  def shape(self) -> tuple[int, ...]:
    """Our (per-layer) shape."""
    return tuple(self.view[p] for p in self.perm)

  def to_ours(self, w: np.ndarray) -> np.ndarray:
    return w.reshape(self.view).transpose(self.perm)

  def to_hf(self, x: np.ndarray) -> np.ndarray:
    return x.transpose(np.argsort(self.perm)).reshape(self.hf_shape)


def _ident(*shape) -> _Conv:
  return _Conv(tuple((s,) for s in shape), tuple(range(len(shape))))


def _layer_map(cfg: ModelConfig) -> list[tuple[str, str, _Conv]]:
  """``(our name under layers/, HF name template, conversion)`` of the per-layer tensors."""
  d, h, k, n, f = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                   cfg.intermediate_size)

  def lin_in(heads):  # [heads*N, D] -> [D, heads, N]
    return _Conv(((heads, n), (d,)), (2, 0, 1))

  def bias(heads):  # [heads*N] -> [heads, N]
    return _Conv(((heads, n),), (0, 1))

  def tr(o, i):  # [out, in] -> [in, out]
    return _Conv(((o,), (i,)), (1, 0))

  a = "model.layers.{i}.self_attn."
  m = [("attn_norm/scale", "model.layers.{i}.input_layernorm.weight", _ident(d)),
       ("q_kernel", a + "q_proj.weight", lin_in(h)),
       ("k_kernel", a + "k_proj.weight", lin_in(k)),
       ("v_kernel", a + "v_proj.weight", lin_in(k)),
       # [D, H*N] -> [H, N, D]
       ("o_kernel", a + "o_proj.weight", _Conv(((d,), (h, n)), (1, 2, 0))),
       ("mlp_norm/scale", "model.layers.{i}.post_attention_layernorm.weight", _ident(d)),
       ("gate_kernel", "model.layers.{i}.mlp.gate_proj.weight", tr(f, d)),
       ("up_kernel", "model.layers.{i}.mlp.up_proj.weight", tr(f, d)),
       ("down_kernel", "model.layers.{i}.mlp.down_proj.weight", tr(d, f))]
  if cfg.qkv_bias:
    m += [("q_bias", a + "q_proj.bias", bias(h)), ("k_bias", a + "k_proj.bias", bias(k)),
          ("v_bias", a + "v_proj.bias", bias(k))]
  if cfg.o_bias:
    m += [("o_bias", a + "o_proj.bias", _ident(d))]
  if cfg.qk_norm:
    m += [("q_norm/scale", a + "q_norm.weight", _ident(n)),
          ("k_norm/scale", a + "k_norm.weight", _ident(n))]
  return m


def _global_map(cfg: ModelConfig) -> list[tuple[str, str, _Conv]]:
  v, d = cfg.vocab_size, cfg.hidden_size
  m = [("embed/embedding", "model.embed_tokens.weight", _ident(v, d)),
       ("final_norm/scale", "model.norm.weight", _ident(d))]
  if not cfg.tie_word_embeddings:
    m.append(("lm_head/kernel", "lm_head.weight", _Conv(((v,), (d,)), (1, 0))))
  return m


def _get(tree, path):
  for p in path.split("/"):
    tree = tree[p]
  return tree


def _set(tree, path, value):
  *head, last = path.split("/")
  for p in head:
    tree = tree.setdefault(p, {})
  tree[last] = value


# ----------------------------------------------------------------------------- import
# Files of a model directory that jaxent or transformers read by name: each
# must be a regular file (a FIFO would block the reader, a device never end).
_READ_NAMES = ("config.json", "generation_config.json", "special_tokens_map.json",
               "added_tokens.json", "merges.txt", "chat_template.jinja", "tokenizer.json",
               "tokenizer_config.json", "tokenizer.model", "vocab.json",
               "model.safetensors.index.json")
_READ_SUFFIXES = (".json", ".safetensors", ".jinja", ".model", ".txt", ".tiktoken")

# safetensors: an 8-byte little-endian header length, a JSON header, then the
# data. The reference implementation refuses headers over 100 MB.
_ST_MAX_HEADER = 100_000_000
_ST_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2,
                "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
_ST_FLOAT = ("F16", "BF16", "F32", "F64")


def _require_dir(path) -> str:
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"checkpoint directory {path!r} does not exist (jaxent reads local "
                            "Hugging Face directories only; it never downloads)")
  require_regular_entries(path, names=_READ_NAMES, suffixes=_READ_SUFFIXES,
                          what="model directory file")
  return path


def _read_json_object(fname: str) -> dict:
  """The JSON object in ``fname``; ValueError naming the file if it is not one."""
  try:
    with open_regular(fname, "rb", what="model directory file") as f:
      raw = json.loads(f.read().decode("utf-8"))
  except (UnicodeDecodeError, ValueError, RecursionError) as e:
    raise ValueError(f"{fname} is not valid JSON: {e}") from None
  if not isinstance(raw, dict):
    raise ValueError(f"{fname}: the top level is a JSON {type(raw).__name__}, not an object")
  return raw


def check_safetensors(fname: str) -> dict[str, tuple[str, tuple[int, ...]]]:
  """Validates a safetensors file's header against the file; ``{name: (dtype, shape)}``.

  Checked before the file is memory-mapped, so a malformed file gives one
  message naming it and the problem instead of an error deep in a reader:
  a header length beyond the file or over 100 MB, a header that is not a
  JSON object, an unknown dtype, a shape that is not a list of
  non-negative ints, data offsets out of the data section, a byte count
  that is not ``prod(shape) * itemsize``, and overlapping tensors.
  """
  import struct

  require_regular(fname, "weights file")
  size = os.path.getsize(fname)
  with open_regular(fname, "rb", what="weights file") as f:
    head = f.read(8)
    if len(head) < 8:
      raise ValueError(f"{fname}: not a safetensors file ({size} bytes, shorter than its "
                       f"8-byte header length)")
    (n,) = struct.unpack("<Q", head)
    if n > _ST_MAX_HEADER or 8 + n > size:
      raise ValueError(f"{fname}: safetensors header length {n} is beyond the file "
                       f"({size} bytes) or over {_ST_MAX_HEADER} bytes; the file is truncated "
                       f"or not safetensors")
    raw = f.read(n)
  try:
    header = json.loads(raw.decode("utf-8"))
  except (UnicodeDecodeError, ValueError, RecursionError) as e:
    raise ValueError(f"{fname}: safetensors header is not valid JSON: {e}") from None
  if not isinstance(header, dict):
    raise ValueError(f"{fname}: safetensors header is not a JSON object")
  data_size = size - 8 - n
  out, spans = {}, []
  for name, info in header.items():
    if name == "__metadata__":
      continue
    where = f"{fname}: tensor {name!r}"
    if not isinstance(info, dict):
      raise ValueError(f"{where}: header entry is not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in _ST_ITEMSIZE:
      raise ValueError(f"{where}: unknown dtype {dtype!r}")
    if (not isinstance(shape, list)
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
      raise ValueError(f"{where}: shape {shape!r} is not a list of non-negative ints")
    if (not isinstance(offsets, list) or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= data_size):
      raise ValueError(f"{where}: data offsets {offsets!r} are outside the data section "
                       f"(0..{data_size}); the file is truncated or corrupt")
    want = math.prod(shape) * _ST_ITEMSIZE[dtype]
    if offsets[1] - offsets[0] != want:
      raise ValueError(f"{where}: {offsets[1] - offsets[0]} bytes for shape {tuple(shape)} of "
                       f"{dtype} ({want} bytes expected)")
    out[name] = (dtype, tuple(shape))
    spans.append((offsets[0], offsets[1], name))
  spans.sort()
  for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
    if start < end:
      raise ValueError(f"{fname}: tensors {a!r} and {b!r} overlap in the data section")
  # The format packs tensors with no gap and nothing after them.
  covered = sum(end - start for start, end, _ in spans)
  if covered != data_size:
    raise ValueError(f"{fname}: the tensors cover {covered} of the {data_size} bytes of the data "
                     f"section; the file is corrupt")
  return out


def _shard_name(index: str, path: str, name) -> str:
  """``name`` from an index's weight_map, refused unless it stays inside ``path``."""
  if not isinstance(name, str) or not name:
    raise ValueError(f"{index} lists a shard that is not a file name: {name!r}")
  norm = os.path.normpath(name)
  if os.path.isabs(name) or norm == os.pardir or norm.startswith(os.pardir + os.sep):
    raise ValueError(f"{index} lists shard {name!r}, which is outside the model directory "
                     f"{path!r}; shards must be files in that directory")
  if not name.endswith(".safetensors"):
    raise ValueError(f"{index} lists {name!r}: only safetensors shards are read")
  return norm


def _weight_files(path: str) -> list[str]:
  index = os.path.join(path, "model.safetensors.index.json")
  single = os.path.join(path, "model.safetensors")
  if os.path.lexists(index):
    weight_map = _read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict):
      raise ValueError(f"{index} has no 'weight_map' object")
    files = sorted({_shard_name(index, path, n) for n in weight_map.values()})
    for name in files:
      if not os.path.lexists(os.path.join(path, name)):
        raise FileNotFoundError(f"shard {os.path.join(path, name)!r} named in {index} is missing")
    return [os.path.join(path, n) for n in files]
  if os.path.lexists(single):
    return [single]
  pickles = sorted(f for f in os.listdir(path) if f.endswith(_PICKLE_SUFFIXES))
  if pickles:
    raise ValueError(f"{path!r} holds only pickle checkpoints ({', '.join(pickles)}); jaxent "
                     "loads safetensors only (pickle can run arbitrary code). Convert with "
                     "transformers: model.save_pretrained(dir, safe_serialization=True)")
  raise FileNotFoundError(f"no weights in {path!r}: expected {single!r} or {index!r}")


def load_config(path, **overrides) -> ModelConfig:
  """``ModelConfig`` from ``path/config.json`` (through ``transformers.AutoConfig``)."""
  path = _require_dir(path)
  cfg_file = os.path.join(path, "config.json")
  if not os.path.lexists(cfg_file):
    raise FileNotFoundError(f"missing {cfg_file!r}")
  raw = _read_json_object(cfg_file)
  # Checked before AutoConfig so that an unknown type gets jaxent's message.
  mt = raw.get("model_type")
  if mt not in SUPPORTED_MODEL_TYPES:
    raise ValueError(f"{cfg_file}: model_type={mt!r} is not supported; "
                     f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
  import transformers  # host-only

  try:
    hf = transformers.AutoConfig.from_pretrained(path, trust_remote_code=False,
                                                 local_files_only=True)
    return ModelConfig.from_hf(hf, **overrides)
  except (TypeError, ValueError, KeyError, AttributeError, ArithmeticError) as e:
    # A field of the wrong type or value (e.g. num_attention_heads: 0).
    raise ValueError(f"{cfg_file}: {e}") from None


def _read_slice(handle, name: str, box: Sequence[tuple[int, int]]) -> np.ndarray:
  """``handle``'s tensor ``name`` at ``[start:stop, ...]`` per dimension: only those bytes
  are read (safetensors memory-maps the file and copies the box out)."""
  return handle.get_slice(name)[tuple(slice(a, b) for a, b in box)]


@dataclasses.dataclass(frozen=True)
class _Leaf:
  """One of our parameters and the HF tensors it is read from (one per layer if stacked)."""
  ours: str                    # "layers/q_kernel"
  hf_names: tuple[str, ...]    # one name, or one per layer
  conv: _Conv
  stacked: bool                # leading layer axis over hf_names

  @property
  def shape(self) -> tuple[int, ...]:
    return ((len(self.hf_names),) if self.stacked else ()) + self.conv.shape


def _runs(sizes: Sequence[int], box: Sequence[tuple[int, int]]):
  """Contiguous row ranges of a dimension split into ``sizes`` that cover ``box`` (a range
  per split dimension), as ``(start, stop, outer index)`` in row-major order.

  Dimensions after the last partial one are whole, so each run covers them whole.
  """
  q = max((j for j, (a, b) in enumerate(box) if (a, b) != (0, sizes[j])), default=0)
  inner = math.prod(sizes[q + 1:])
  for outer in itertools.product(*(range(a, b) for a, b in box[:q])):
    flat = 0
    for j, o in enumerate(outer):
      flat = flat * sizes[j] + o
    start = (flat * sizes[q] + box[q][0]) * inner
    yield start, start + (box[q][1] - box[q][0]) * inner, outer


def _read_into(out: np.ndarray, handle, name: str, conv: _Conv, box) -> None:
  """Fills ``out`` (our layout, shape of ``box``) with ``box`` of ours from HF tensor ``name``.

  ``out.transpose(inv perm)`` is a view of ``out`` in the split-HF layout; each
  HF read (a product of row runs, usually one) is written into it in place,
  with the dtype cast, so no whole tensor and no second copy exists on the host.
  """
  vbox = [None] * len(box)
  for j, p in enumerate(conv.perm):
    vbox[p] = box[j]
  vout = out.transpose(np.argsort(conv.perm))
  per_dim = [list(_runs(g, vb)) for g, vb in zip(conv.groups, _split(vbox, conv.groups))]
  for combo in itertools.product(*per_dim):
    hf_box, dest, rshape = [], [], []
    for g, (start, stop, outer), vb in zip(conv.groups, combo, _split(vbox, conv.groups)):
      hf_box.append((start, stop))
      for j, (a, b) in enumerate(vb):
        if j < len(outer):
          dest.append(slice(outer[j] - a, outer[j] - a + 1))
          rshape.append(1)
        else:
          dest.append(slice(None))
          rshape.append(b - a)
    vout[tuple(dest)] = _read_slice(handle, name, hf_box).reshape(rshape)


def _split(vbox, groups):
  """``vbox`` (one range per view dimension) cut into the groups of each HF dimension."""
  v = 0
  for g in groups:
    yield vbox[v:v + len(g)]
    v += len(g)


def _box(index, shape) -> tuple[tuple[int, int], ...]:
  """A device's index (tuple of slices) as ``(start, stop)`` per dimension."""
  index = tuple(index) + (slice(None),) * (len(shape) - len(index))
  out = []
  for s, n in zip(index, shape):
    a, b, step = s.indices(n)
    if step != 1:
      raise ValueError(f"strided shard index {index} is not supported")
    out.append((a, b))
  return tuple(out)


class _NonFinite(Exception):
  """A tensor read holds NaN or inf (``args[0]``: its HF name)."""


def _read_leaf(leaf: _Leaf, handles, dtype, box) -> np.ndarray:
  """``box`` of ``leaf`` in ``dtype``: for a stacked leaf, the boxed layers' slices only.

  Raises ``_NonFinite`` naming the HF tensor if a value read is NaN or inf
  (checked on each slice as it is read: one pass over host memory).
  """
  out = np.empty(tuple(b - a for a, b in box), dtype)
  if leaf.stacked:
    (l0, l1), rest = box[0], box[1:]
    for j, name in enumerate(leaf.hf_names[l0:l1]):
      _read_into(out[j], handles[name], name, leaf.conv, rest)
      if not np.isfinite(out[j]).all():
        raise _NonFinite(name)
  else:
    name = leaf.hf_names[0]
    _read_into(out, handles[name], name, leaf.conv, box)
    if not np.isfinite(out).all():
      raise _NonFinite(name)
  return out


def _place_leaf(leaf: _Leaf, handles, dtype, sharding: Sharding) -> jax.Array:
  """``leaf`` as a global array laid out by ``sharding``, read one shard at a time.

  Only this process's devices are filled (``addressable_devices_indices_map``),
  so each host reads its own slices. Devices holding the same box (replicas)
  share one read; each box is put on its devices and waited for before the
  next is read, so the host holds one shard's slice at a time.
  (``jax.make_array_from_callback`` would call back once per device and keep
  every host slice until all are read.)
  """
  by_box: dict[tuple, list] = {}
  for dev, index in sharding.addressable_devices_indices_map(leaf.shape).items():
    by_box.setdefault(_box(index, leaf.shape), []).append(dev)
  arrays = []
  for box, devs in by_box.items():
    host = _read_leaf(leaf, handles, dtype, box)
    put = [jax.device_put(host, d) for d in devs]
    jax.block_until_ready(put)
    arrays += put
    del host
  return jax.make_array_from_single_device_arrays(leaf.shape, sharding, arrays, dtype=dtype)


def _plan(cfg: ModelConfig, shapes: Mapping[str, tuple[int, ...]], path: str) -> list[_Leaf]:
  """Our leaves and their HF tensors, checked against the header shapes (no data read).

  Raises ValueError for a tensor whose shape disagrees with the config and for
  missing or unexpected tensors (all named).
  """
  used: set[str] = set()
  missing: list[str] = []
  leaves: list[_Leaf] = []

  def check(hf_name, ours, conv):
    if hf_name not in shapes:
      missing.append(hf_name)
      return False
    used.add(hf_name)
    if tuple(shapes[hf_name]) != conv.hf_shape:
      raise ValueError(f"tensor {hf_name!r} has shape {tuple(shapes[hf_name])}, which does not "
                       f"match the config (expected {ours} of shape {conv.shape})")
    return True

  for ours, hf_name, conv in _global_map(cfg):
    if check(hf_name, ours, conv):
      leaves.append(_Leaf(ours, (hf_name,), conv, stacked=False))
  if cfg.tie_word_embeddings and "lm_head.weight" in shapes:
    used.add("lm_head.weight")  # some exporters write the tied copy too; it is ignored
  for ours, tmpl, conv in _layer_map(cfg):
    names = tuple(tmpl.format(i=i) for i in range(cfg.num_layers))
    if all([check(name, ours, conv) for name in names]):
      leaves.append(_Leaf("layers/" + ours, names, conv, stacked=True))
  unexpected = sorted(k for k in shapes if k not in used and not k.endswith(_IGNORED_SUFFIXES))
  if missing or unexpected:
    msg = [f"checkpoint {path!r} does not match its config "
           f"(model_type={cfg.model_type!r}, tie_word_embeddings={cfg.tie_word_embeddings})"]
    if missing:
      msg.append(f"missing tensors ({len(missing)}): {', '.join(missing[:20])}"
                 + (" ..." if len(missing) > 20 else ""))
    if unexpected:
      msg.append(f"unexpected tensors ({len(unexpected)}): {', '.join(unexpected[:20])}"
                 + (" ..." if len(unexpected) > 20 else ""))
    raise ValueError("; ".join(msg))
  return leaves


def _check_shardings(shardings, cfg: ModelConfig) -> dict[str, Sharding]:
  """``shardings`` as ``{"layers/q_kernel": sharding}``, checked against the params' shapes."""
  shapes = param_shapes(cfg)
  is_sh = lambda x: isinstance(x, Sharding)  # noqa: E731
  want = jax.tree.structure(shapes)
  got = jax.tree.structure(shardings, is_leaf=is_sh)
  if got != want:
    raise ValueError(f"shardings: expected a pytree of jax.sharding.Sharding like the params "
                     f"{want}, got {got}")
  out = {}
  for (kp, s), x in zip(jax.tree_util.tree_flatten_with_path(shardings, is_leaf=is_sh)[0],
                        jax.tree.leaves(shapes)):
    name = "/".join(str(k.key) for k in kp)
    if not is_sh(s):
      raise ValueError(f"shardings: {name} is {s!r}, not a jax.sharding.Sharding")
    try:
      s.shard_shape(x.shape)
    except ValueError as e:
      raise ValueError(f"shardings: {name} of shape {x.shape} cannot be laid out by {s}: "
                       f"{e}") from e
    out[name] = s
  return out


def from_pretrained(path, dtype="float32", *, param_dtype=None, remat: bool = False,
                    shardings=None, mesh=None) -> Model:
  """Load a local HF checkpoint directory (``config.json`` + safetensors).

  Every parameter is read through safetensors slices of the memory-mapped
  files. Without ``shardings``/``mesh`` each parameter is read whole and put
  on the default device (one parameter on the host at a time). With them,
  each parameter is created shard by shard: for each box of the parameter
  that one of this process's devices holds, only that box is read (for a
  layer-stacked parameter, only the boxed layers, and of each only the boxed
  part), converted to our layout and dtype, and put on its devices; no
  parameter ever exists whole on the host or on one device.

  Args:
    path: directory with ``config.json`` and ``model.safetensors`` or a
      sharded ``model.safetensors.index.json``.
    dtype: compute dtype ("float32" | "bfloat16"); parameters are stored in
      ``param_dtype`` (default: ``dtype``).
    remat: rematerialize each layer in the backward pass.
    shardings: optional pytree like the params of ``jax.sharding.Sharding``
      (e.g. ``param_shardings(cfg, mesh)``); the loaded arrays have exactly
      these shardings.
    mesh: optional ``Mesh``; shorthand for ``shardings=param_shardings(cfg,
      mesh)`` (the logical-axis table: the trainer's and sampler's layout).

  Raises:
    FileNotFoundError naming a missing file; ValueError for an unsupported
    ``model_type``, pickle-only checkpoints, a tensor whose shape disagrees
    with the config (named), missing or unexpected tensors (named), and
    ``shardings`` that do not fit the params. All are raised from the config
    and the safetensors headers, before any tensor data is read.
  """
  from safetensors import safe_open  # host-only

  if shardings is not None and mesh is not None:
    raise ValueError("from_pretrained: give shardings or mesh, not both")
  cfg = load_config(path, dtype=dtype, param_dtype=param_dtype or dtype, remat=remat)
  files = _weight_files(os.fspath(path))
  if mesh is not None:
    shardings = param_shardings(cfg, mesh)
  by_name = None if shardings is None else _check_shardings(shardings, cfg)
  pdt = cfg.param_dtype
  with contextlib.ExitStack() as stack:
    handles: dict[str, Any] = {}
    sources: dict[str, str] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, str] = {}
    for fname in files:
      header = check_safetensors(fname)
      try:
        f = stack.enter_context(safe_open(fname, framework="numpy"))
      except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError
        raise ValueError(f"{fname}: cannot read safetensors: {e}") from None
      for key, (dtype, shape) in header.items():
        if key in handles:
          raise ValueError(f"tensor {key!r} appears in both {sources[key]} and {fname}")
        handles[key], sources[key] = f, fname
        shapes[key], dtypes[key] = shape, dtype
    params: dict = {}
    for leaf in _plan(cfg, shapes, os.fspath(path)):
      for name in leaf.hf_names:
        if dtypes[name] not in _ST_FLOAT:
          raise ValueError(f"tensor {name!r} in {sources[name]} has dtype {dtypes[name]}; "
                           f"parameters must be one of {', '.join(_ST_FLOAT)}")
      try:
        if by_name is None:
          full = tuple((0, n) for n in leaf.shape)
          _set(params, leaf.ours, jnp.asarray(_read_leaf(leaf, handles, pdt, full)))
        else:
          _set(params, leaf.ours, _place_leaf(leaf, handles, pdt, by_name[leaf.ours]))
      except _NonFinite as e:
        raise ValueError(f"tensor {e.args[0]!r} in {sources[e.args[0]]} holds NaN or inf values "
                         f"({leaf.ours}); refusing to load non-finite weights") from None
  return Model(params=params, config=cfg)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# The parts of a tokenizer.json that decide ids and decoded text (with the
# vocabulary, checked by size and model type, and the added tokens).
_TOKENIZER_PARTS = ("normalizer", "pre_tokenizer", "decoder")


def load_tokenizer(path):
  """The tokenizer of a local HF directory (no remote code, no downloads).

  With a ``tokenizer.json`` the result is the generic fast tokenizer
  (``transformers.PreTrainedTokenizerFast``) built from that file, so it
  encodes and decodes exactly as ``tokenizers.Tokenizer.from_file`` does;
  ``tokenizer_config.json`` still supplies the bos/eos/pad/unk and added
  special tokens, ``chat_template`` (or ``chat_template.jinja``),
  ``padding_side``, ``add_bos_token`` / ``add_eos_token`` and
  ``clean_up_tokenization_spaces``. ``AutoTokenizer`` is not used there: in
  transformers 5 it picks the class registered for ``config.json``'s
  ``model_type`` (``Qwen2Tokenizer`` for qwen2/qwen3, ``LlamaTokenizer`` when
  the config names it), and those classes rebuild the tokenizer from the
  vocabulary with their own normalizer, pre-tokenizer and decoder, silently
  replacing a custom ``tokenizer.json``'s (a word-level vocabulary lost its
  spaces), inventing special tokens the files do not name and dropping
  tokenizer.json's added tokens that tokenizer_config.json does not list.

  Without ``tokenizer.json`` (a sentencepiece ``tokenizer.model``, or
  ``vocab.json`` + ``merges.txt``) it is ``AutoTokenizer``'s conversion.

  Raises:
    FileNotFoundError: no directory, or no usable tokenizer files in it.
    ValueError: the loaded tokenizer's normalizer, pre-tokenizer, decoder,
      model or added tokens differ from ``tokenizer.json`` (named).
  """
  path = _require_dir(path)
  # Without these files transformers 5 silently builds an empty tokenizer
  # from config.json alone.
  if not any(os.path.lexists(os.path.join(path, f)) for f in _TOKENIZER_FILES):
    raise FileNotFoundError(f"no tokenizer in {path!r}: expected one of "
                            f"{', '.join(_TOKENIZER_FILES)}")
  import transformers  # host-only

  tokenizer_json = os.path.join(path, "tokenizer.json")
  for name in ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
    if os.path.lexists(os.path.join(path, name)):
      _read_json_object(os.path.join(path, name))  # ValueError naming a malformed file
  try:
    if os.path.lexists(tokenizer_json):
      tok = transformers.PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    else:
      tok = transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=False,
                                                       local_files_only=True)
  except (OSError, ValueError) as e:
    raise FileNotFoundError(f"no usable tokenizer files in {path!r}: {e}") from e
  except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception on a bad file
    raise ValueError(f"malformed tokenizer files in {path!r}: {type(e).__name__}: "
                     f"{str(e)[:300]}") from None
  if os.path.lexists(tokenizer_json):
    _check_tokenizer_json(tok.backend_tokenizer, tokenizer_json)
  return tok


def _check_tokenizer_json(got, tokenizer_json: str) -> None:
  """Raises unless the backend ``got`` tokenizes as ``tokenizer_json`` does.

  Guards the guarantee of ``load_tokenizer`` against transformers rewriting
  the backend (as its model-specific classes and its Mistral regex patch do).
  The post-processor is not compared: ``add_bos_token`` / ``add_eos_token``
  in tokenizer_config.json legitimately rebuild it. Added tokens may grow
  (special tokens the config names) but keep their ids.
  """
  import tokenizers  # host-only

  try:
    ref = tokenizers.Tokenizer.from_file(require_regular(tokenizer_json, "tokenizer file"))
  except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception on a bad file
    raise ValueError(f"{tokenizer_json} is malformed: {str(e)[:300]}") from None

  def state(part):
    return None if part is None else part.__getstate__()

  for name in _TOKENIZER_PARTS:
    if state(getattr(got, name)) != state(getattr(ref, name)):
      raise ValueError(f"loaded tokenizer's {name} differs from {tokenizer_json!r}: "
                       f"{state(getattr(got, name))!r} vs {state(getattr(ref, name))!r}")
  if (type(got.model) is not type(ref.model)
      or got.get_vocab_size(with_added_tokens=False) != ref.get_vocab_size(with_added_tokens=False)):
    raise ValueError(f"loaded tokenizer's model ({type(got.model).__name__}, "
                     f"{got.get_vocab_size(with_added_tokens=False)} tokens) differs from "
                     f"{tokenizer_json!r} ({type(ref.model).__name__}, "
                     f"{ref.get_vocab_size(with_added_tokens=False)} tokens)")
  moved = {t.content: (i, got.token_to_id(t.content))
           for i, t in ref.get_added_tokens_decoder().items() if got.token_to_id(t.content) != i}
  if moved:
    raise ValueError(f"added tokens of {tokenizer_json!r} changed id (file id, loaded id): {moved}")


# ----------------------------------------------------------------------------- export
def hf_state_dict(model: Model) -> dict[str, np.ndarray]:
  """The model's tensors under HF names and layouts (host NumPy, param dtype)."""
  cfg = model.config
  params = jax.device_get(model.params)
  out: dict[str, np.ndarray] = {}
  for ours, hf_name, conv in _global_map(cfg):
    out[hf_name] = np.ascontiguousarray(conv.to_hf(np.asarray(_get(params, ours))))
  for ours, tmpl, conv in _layer_map(cfg):
    stacked = np.asarray(_get(params["layers"], ours))
    for i in range(cfg.num_layers):
      out[tmpl.format(i=i)] = np.ascontiguousarray(conv.to_hf(stacked[i]))
  return out


def save_pretrained(model: Model, out_dir, tokenizer=None) -> str:
  """Write ``config.json`` + ``model.safetensors`` (+ tokenizer files).

  The directory loads with ``transformers.AutoModelForCausalLM.from_pretrained``
  and with ``from_pretrained`` here. Tensors keep the parameters' dtype.
  """
  from safetensors.numpy import save_file  # host-only

  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  model.config.to_hf().save_pretrained(out_dir)
  # "format": "pt" is what transformers checks for in safetensors metadata.
  save_file(hf_state_dict(model), os.path.join(out_dir, "model.safetensors"),
            metadata={"format": "pt"})
  if tokenizer is not None:
    tokenizer.save_pretrained(out_dir)
  return out_dir
