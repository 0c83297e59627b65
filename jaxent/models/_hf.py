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

import json
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxent.models._config import SUPPORTED_MODEL_TYPES, ModelConfig
from jaxent.models._model import Model, param_shapes

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Buffers some exporters write that carry no parameters.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _layer_map(cfg: ModelConfig):
  """``(our name, HF name template, to_ours, to_hf)`` for the per-layer tensors."""
  d, h, k, n = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

  def lin_in(heads):  # [heads*N, D] <-> [D, heads, N]
    return (lambda w: w.reshape(heads, n, d).transpose(2, 0, 1),
            lambda w: w.transpose(1, 2, 0).reshape(heads * n, d))

  def bias(heads):
    return (lambda b: b.reshape(heads, n), lambda b: b.reshape(heads * n))

  ident = (lambda w: w, lambda w: w)
  tr = (lambda w: w.T, lambda w: w.T)
  a = "model.layers.{i}.self_attn."
  m = [("attn_norm/scale", "model.layers.{i}.input_layernorm.weight", *ident),
       ("q_kernel", a + "q_proj.weight", *lin_in(h)),
       ("k_kernel", a + "k_proj.weight", *lin_in(k)),
       ("v_kernel", a + "v_proj.weight", *lin_in(k)),
       ("o_kernel", a + "o_proj.weight",
        lambda w: w.reshape(d, h, n).transpose(1, 2, 0),
        lambda w: w.transpose(2, 0, 1).reshape(d, h * n)),
       ("mlp_norm/scale", "model.layers.{i}.post_attention_layernorm.weight", *ident),
       ("gate_kernel", "model.layers.{i}.mlp.gate_proj.weight", *tr),
       ("up_kernel", "model.layers.{i}.mlp.up_proj.weight", *tr),
       ("down_kernel", "model.layers.{i}.mlp.down_proj.weight", *tr)]
  if cfg.qkv_bias:
    m += [("q_bias", a + "q_proj.bias", *bias(h)), ("k_bias", a + "k_proj.bias", *bias(k)),
          ("v_bias", a + "v_proj.bias", *bias(k))]
  if cfg.o_bias:
    m += [("o_bias", a + "o_proj.bias", *ident)]
  if cfg.qk_norm:
    m += [("q_norm/scale", a + "q_norm.weight", *ident),
          ("k_norm/scale", a + "k_norm.weight", *ident)]
  return m


def _global_map(cfg: ModelConfig):
  tr = (lambda w: w.T, lambda w: w.T)
  ident = (lambda w: w, lambda w: w)
  m = [("embed/embedding", "model.embed_tokens.weight", *ident),
       ("final_norm/scale", "model.norm.weight", *ident)]
  if not cfg.tie_word_embeddings:
    m.append(("lm_head/kernel", "lm_head.weight", *tr))
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
def _require_dir(path) -> str:
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"checkpoint directory {path!r} does not exist (jaxent reads local "
                            "Hugging Face directories only; it never downloads)")
  return path


def _weight_files(path: str) -> list[str]:
  index = os.path.join(path, "model.safetensors.index.json")
  single = os.path.join(path, "model.safetensors")
  if os.path.isfile(index):
    with open(index) as f:
      weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict):
      raise ValueError(f"{index} has no 'weight_map'")
    files = sorted(set(weight_map.values()))
    for name in files:
      if not name.endswith(".safetensors"):
        raise ValueError(f"{index} lists {name!r}: only safetensors shards are read")
      if not os.path.isfile(os.path.join(path, name)):
        raise FileNotFoundError(f"shard {os.path.join(path, name)!r} named in {index} is missing")
    return [os.path.join(path, n) for n in files]
  if os.path.isfile(single):
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
  if not os.path.isfile(cfg_file):
    raise FileNotFoundError(f"missing {cfg_file!r}")
  with open(cfg_file) as f:
    raw = json.load(f)
  # Checked before AutoConfig so that an unknown type gets jaxent's message.
  mt = raw.get("model_type")
  if mt not in SUPPORTED_MODEL_TYPES:
    raise ValueError(f"{cfg_file}: model_type={mt!r} is not supported; "
                     f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
  import transformers  # host-only

  hf = transformers.AutoConfig.from_pretrained(path, trust_remote_code=False,
                                               local_files_only=True)
  return ModelConfig.from_hf(hf, **overrides)


def from_pretrained(path, dtype="float32", *, param_dtype=None, remat: bool = False) -> Model:
  """Load a local HF checkpoint directory (``config.json`` + safetensors).

  Args:
    path: directory with ``config.json`` and ``model.safetensors`` or a
      sharded ``model.safetensors.index.json``.
    dtype: compute dtype ("float32" | "bfloat16"); parameters are stored in
      ``param_dtype`` (default: ``dtype``).
    remat: rematerialize each layer in the backward pass.

  Raises:
    FileNotFoundError naming a missing file; ValueError for an unsupported
    ``model_type``, pickle-only checkpoints, a tensor whose shape disagrees
    with the config (named), and missing or unexpected tensors (named).
  """
  from safetensors import safe_open  # host-only

  cfg = load_config(path, dtype=dtype, param_dtype=param_dtype or dtype, remat=remat)
  files = _weight_files(os.fspath(path))
  pdt = cfg.param_dtype
  tensors: dict[str, np.ndarray] = {}
  sources: dict[str, str] = {}
  for fname in files:
    with safe_open(fname, framework="numpy") as f:
      for key in f.keys():
        if key in tensors:
          raise ValueError(f"tensor {key!r} appears in both {sources[key]} and {fname}")
        tensors[key] = f.get_tensor(key)
        sources[key] = fname

  expected = param_shapes(cfg)
  used: set[str] = set()
  params: dict = {}

  def take(hf_name, ours, shape, convert):
    if hf_name not in tensors:
      return None
    used.add(hf_name)
    w = tensors[hf_name]
    try:
      w = convert(w)
    except ValueError:
      pass  # reshape failed: reported as a shape mismatch below
    if tuple(w.shape) != tuple(shape):
      raise ValueError(f"tensor {hf_name!r} has shape {tuple(tensors[hf_name].shape)}, which "
                       f"does not match the config (expected {ours} of shape {tuple(shape)})")
    return np.asarray(w).astype(pdt)

  missing = []
  for ours, hf_name, to_ours, _ in _global_map(cfg):
    shape = _get(expected, ours).shape
    w = take(hf_name, ours, shape, to_ours)
    if w is None:
      missing.append(hf_name)
    else:
      _set(params, ours, w)
  if cfg.tie_word_embeddings and "lm_head.weight" in tensors:
    used.add("lm_head.weight")  # some exporters write the tied copy too; it is ignored
  for ours, tmpl, to_ours, _ in _layer_map(cfg):
    shape = _get(expected["layers"], ours).shape[1:]
    stack = []
    for i in range(cfg.num_layers):
      w = take(tmpl.format(i=i), ours, shape, to_ours)
      if w is None:
        missing.append(tmpl.format(i=i))
      stack.append(w)
    if all(w is not None for w in stack):
      _set(params, "layers/" + ours, np.stack(stack))
  unexpected = sorted(k for k in tensors if k not in used and not k.endswith(_IGNORED_SUFFIXES))
  if missing or unexpected:
    msg = [f"checkpoint {os.fspath(path)!r} does not match its config "
           f"(model_type={cfg.model_type!r}, tie_word_embeddings={cfg.tie_word_embeddings})"]
    if missing:
      msg.append(f"missing tensors ({len(missing)}): {', '.join(missing[:20])}"
                 + (" ..." if len(missing) > 20 else ""))
    if unexpected:
      msg.append(f"unexpected tensors ({len(unexpected)}): {', '.join(unexpected[:20])}"
                 + (" ..." if len(unexpected) > 20 else ""))
    raise ValueError("; ".join(msg))
  del tensors
  params = jax.tree.map(jnp.asarray, params)
  return Model(params=params, config=cfg)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(path):
  """``transformers.AutoTokenizer`` from a local directory (no remote code)."""
  path = _require_dir(path)
  # Without these files transformers 5 silently builds an empty tokenizer
  # from config.json alone.
  if not any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES):
    raise FileNotFoundError(f"no tokenizer in {path!r}: expected one of "
                            f"{', '.join(_TOKENIZER_FILES)}")
  import transformers  # host-only

  try:
    return transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=False,
                                                      local_files_only=True)
  except (OSError, ValueError) as e:
    raise FileNotFoundError(f"no usable tokenizer files in {path!r}: {e}") from e


# ----------------------------------------------------------------------------- export
def hf_state_dict(model: Model) -> dict[str, np.ndarray]:
  """The model's tensors under HF names and layouts (host NumPy, param dtype)."""
  cfg = model.config
  params = jax.device_get(model.params)
  out: dict[str, np.ndarray] = {}
  conv: Callable
  for ours, hf_name, _, conv in _global_map(cfg):
    out[hf_name] = np.ascontiguousarray(conv(np.asarray(_get(params, ours))))
  for ours, tmpl, _, conv in _layer_map(cfg):
    stacked = np.asarray(_get(params["layers"], ours))
    for i in range(cfg.num_layers):
      out[tmpl.format(i=i)] = np.ascontiguousarray(conv(stacked[i]))
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
