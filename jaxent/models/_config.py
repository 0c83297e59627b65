"""``ModelConfig``: the architecture of a Qwen2 / Llama / Qwen3 decoder.

One frozen, hashable dataclass covers the three families; it is passed to
``jax.jit`` as a static argument, so every field is hashable (``rope_scaling``
is stored as a ``FrozenDict``, dtypes as ``numpy.dtype``).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax.core import FrozenDict

SUPPORTED_MODEL_TYPES = ("qwen2", "llama", "qwen3")
# RoPE variants whose inverse frequencies do not depend on the sequence length.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
_DTYPES = ("float32", "bfloat16", "float16")
_HF_ARCH = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def _as_dtype(value, name: str) -> np.dtype:
  try:
    dt = jnp.dtype(value)
  except TypeError as e:
    raise ValueError(f"{name}={value!r} is not a dtype; use one of {_DTYPES}") from e
  if dt.name not in _DTYPES:
    raise ValueError(f"{name}={value!r} is not supported; use one of {_DTYPES}")
  return dt


def _freeze(x):
  if isinstance(x, Mapping):
    return FrozenDict({k: _freeze(v) for k, v in x.items()})
  if isinstance(x, list):
    return tuple(_freeze(v) for v in x)
  return x


def _thaw(x):
  if isinstance(x, Mapping):
    return {k: _thaw(v) for k, v in x.items()}
  if isinstance(x, tuple):
    return [_thaw(v) for v in x]
  return x


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
  """Decoder architecture (all three families share one forward pass).

  Per layer ``l`` (pre-norm residual; HF's ``LlamaDecoderLayer``)::

    h = x + Attn(RMSNorm(x)),   x' = h + W_down (silu(W_gate n) * (W_up n)),  n = RMSNorm(h)

  with grouped-query attention (``num_heads`` query heads share
  ``num_kv_heads`` key/value heads) and RoPE on q and k.

  ``qkv_bias``, ``o_bias`` and ``qk_norm`` default (``None``) to the family's
  choice: Qwen2 has q/k/v biases and no o bias; Qwen3 normalizes q and k per
  head (``RMSNorm`` over ``head_dim``); Llama has neither.
  """
  model_type: str  # "qwen2" | "llama" | "qwen3": also selects the HF class on export
  vocab_size: int  # V
  hidden_size: int  # D
  num_layers: int  # L
  num_heads: int  # H, query heads
  intermediate_size: int  # F, SwiGLU width
  num_kv_heads: int | None = None  # K, key/value heads (GQA); None: = num_heads
  head_dim: int | None = None  # Dh; None: hidden_size // num_heads
  rope_theta: float = 10000.0  # RoPE base
  rope_scaling: Mapping[str, Any] | None = None  # HF rope_parameters minus theta; None: default
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = False  # logits use the embedding matrix transposed
  qkv_bias: bool | None = None  # biases on q/k/v projections (Qwen2: True)
  qk_norm: bool | None = None  # per-head RMSNorm on q and k before RoPE (Qwen3: True)
  max_position_embeddings: int = 32768  # informational (exported to HF); not enforced
  dtype: Any = "float32"  # compute dtype of activations; logits are always float32
  param_dtype: Any = "float32"  # storage dtype of the parameters
  remat: bool = False  # jax.checkpoint each layer (recompute activations in backward)
  # Queries per attention chunk when T exceeds it (q_chunk x S scores instead of T x S,
  # forward and backward; same numbers); 0 = always whole attention. See _attention.py.
  attention_chunk: int = 512
  o_bias: bool | None = None  # bias on the output projection (Llama attention_bias=True)
  initializer_range: float = 0.02  # std of the normal init of matrices (random init)
  bos_token_id: int | None = None  # exported to HF; the sampler may read eos_token_id
  eos_token_id: int | tuple[int, ...] | None = None
  pad_token_id: int | None = None

  def __post_init__(self):
    def put(name, value):
      object.__setattr__(self, name, value)

    if self.model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(f"model_type={self.model_type!r} is not supported; "
                       f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size"):
      v = getattr(self, name)
      if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    if self.num_kv_heads is None:
      put("num_kv_heads", self.num_heads)
    if self.head_dim is None:
      if self.hidden_size % self.num_heads:
        raise ValueError(f"head_dim is None but hidden_size={self.hidden_size} is not divisible "
                         f"by num_heads={self.num_heads}; give head_dim")
      put("head_dim", self.hidden_size // self.num_heads)
    for name in ("num_kv_heads", "head_dim"):
      v = getattr(self, name)
      if not isinstance(v, (int, np.integer)) or v <= 0:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} must be a multiple of "
                       f"num_kv_heads={self.num_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
    if self.rms_norm_eps <= 0 or self.rope_theta <= 0:
      raise ValueError(f"rms_norm_eps={self.rms_norm_eps} and rope_theta={self.rope_theta} "
                       "must be positive")
    is_qwen2 = self.model_type == "qwen2"
    if self.qkv_bias is None:
      put("qkv_bias", is_qwen2)
    if self.qk_norm is None:
      put("qk_norm", self.model_type == "qwen3")
    if self.o_bias is None:
      put("o_bias", False if is_qwen2 else bool(self.qkv_bias))
    # Each family's HF class hard-codes some choices; reject what it cannot express
    # so that every config round-trips through save_pretrained.
    if is_qwen2 and (not self.qkv_bias or self.o_bias or self.qk_norm):
      raise ValueError("model_type='qwen2' has qkv_bias=True, o_bias=False, qk_norm=False; got "
                       f"qkv_bias={self.qkv_bias}, o_bias={self.o_bias}, qk_norm={self.qk_norm}")
    if not is_qwen2 and self.qkv_bias != self.o_bias:
      raise ValueError(f"model_type={self.model_type!r} uses one attention_bias flag for q/k/v/o; "
                       f"got qkv_bias={self.qkv_bias}, o_bias={self.o_bias}")
    if self.model_type == "llama" and self.qk_norm:
      raise ValueError("model_type='llama' has no qk_norm; use model_type='qwen3'")
    if self.model_type == "qwen3" and not self.qk_norm:
      raise ValueError("model_type='qwen3' always has qk_norm=True")
    put("dtype", _as_dtype(self.dtype, "dtype"))
    put("param_dtype", _as_dtype(self.param_dtype, "param_dtype"))
    put("remat", bool(self.remat))
    ac = self.attention_chunk
    if not isinstance(ac, (int, np.integer)) or isinstance(ac, bool) or ac < 0:
      raise ValueError(f"attention_chunk must be an int >= 0 (0 = whole attention), got {ac!r}")
    put("attention_chunk", int(ac))
    put("tie_word_embeddings", bool(self.tie_word_embeddings))
    put("rope_theta", float(self.rope_theta))
    if isinstance(self.eos_token_id, list):
      put("eos_token_id", tuple(self.eos_token_id))
    rs = self.rope_scaling
    if rs is not None:
      if not isinstance(rs, Mapping):
        raise ValueError(f"rope_scaling must be None or a dict, got {rs!r}")
      rs = {k: v for k, v in rs.items() if k != "rope_theta"}
      rtype = rs.get("rope_type", rs.get("type", "default"))
      if rtype not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope_scaling type {rtype!r} is not supported; "
                         f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
      if rs.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("rope_scaling.partial_rotary_factor != 1 is not supported")
      need = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                                 "original_max_position_embeddings")}
      for key in need.get(rtype, ()):
        if key not in rs:
          raise ValueError(f"rope_scaling of type {rtype!r} needs {key!r}; got {dict(rs)}")
      rs.pop("type", None)
      rs["rope_type"] = rtype
      rs = None if rtype == "default" else _freeze(rs)
    put("rope_scaling", rs)

  @property
  def rope_type(self) -> str:
    return "default" if self.rope_scaling is None else self.rope_scaling["rope_type"]

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  # ---------------------------------------------------------------- HF <-> jaxent
  @classmethod
  def from_hf(cls, hf_config, **overrides) -> "ModelConfig":
    """From a ``transformers`` config (Qwen2Config, LlamaConfig, Qwen3Config).

    Reads ``rope_parameters`` (transformers >= 5) or the older
    ``rope_theta`` / ``rope_scaling`` attributes. ``overrides`` set jaxent-only
    fields (``dtype``, ``param_dtype``, ``remat``, ``attention_chunk``).
    """
    get = lambda k, d=None: getattr(hf_config, k, d)  # noqa: E731
    mt = get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
      raise ValueError(f"model_type={mt!r} is not supported; "
                       f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    act = get("hidden_act", "silu")
    if act not in ("silu", "swish"):
      raise ValueError(f"hidden_act={act!r} is not supported; only 'silu' (SwiGLU)")
    if get("mlp_bias", False):
      raise ValueError("mlp_bias=True is not supported")
    if get("use_sliding_window", False) or "sliding_attention" in (get("layer_types") or ()):
      raise ValueError("sliding-window attention (use_sliding_window=True) is not supported")
    rp = get("rope_parameters")
    if rp is None:
      rp = dict(get("rope_scaling") or {})
    rp = dict(rp)
    theta = rp.pop("rope_theta", None)
    if theta is None:
      theta = get("rope_theta", 10000.0)
    rtype = rp.get("rope_type", rp.get("type", "default"))
    heads = get("num_attention_heads")
    for name in ("num_attention_heads", "hidden_size"):
      v = get(name)
      if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    head_dim = get("head_dim") or get("hidden_size") // heads
    if mt == "qwen2":
      qkv_bias, o_bias = True, False
    else:
      qkv_bias = o_bias = bool(get("attention_bias", False))
    eos = get("eos_token_id")
    kw = dict(
        model_type=mt, vocab_size=get("vocab_size"), hidden_size=get("hidden_size"),
        num_layers=get("num_hidden_layers"), num_heads=heads,
        num_kv_heads=get("num_key_value_heads") or heads, head_dim=head_dim,
        intermediate_size=get("intermediate_size"), rope_theta=float(theta),
        rope_scaling=None if rtype == "default" else rp, rms_norm_eps=get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(get("tie_word_embeddings", False)), qkv_bias=qkv_bias,
        o_bias=o_bias, qk_norm=(mt == "qwen3"),
        max_position_embeddings=get("max_position_embeddings", 32768),
        initializer_range=get("initializer_range", 0.02), bos_token_id=get("bos_token_id"),
        eos_token_id=tuple(eos) if isinstance(eos, (list, tuple)) else eos,
        pad_token_id=get("pad_token_id"))
    kw.update(overrides)
    return cls(**kw)

  def to_hf(self):
    """The equivalent ``transformers`` config (loads with ``AutoModelForCausalLM``)."""
    import transformers  # host-only dependency, imported lazily

    cls = {"qwen2": transformers.Qwen2Config, "llama": transformers.LlamaConfig,
           "qwen3": transformers.Qwen3Config}[self.model_type]
    rope = {"rope_type": "default", "rope_theta": self.rope_theta}
    if self.rope_scaling is not None:
      rope.update(_thaw(self.rope_scaling))
    kw = dict(
        vocab_size=self.vocab_size, hidden_size=self.hidden_size,
        intermediate_size=self.intermediate_size, num_hidden_layers=self.num_layers,
        num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads,
        head_dim=self.head_dim, max_position_embeddings=self.max_position_embeddings,
        rms_norm_eps=self.rms_norm_eps, tie_word_embeddings=self.tie_word_embeddings,
        rope_parameters=rope, hidden_act="silu", initializer_range=self.initializer_range,
        bos_token_id=self.bos_token_id,
        eos_token_id=list(self.eos_token_id) if isinstance(self.eos_token_id, tuple)
        else self.eos_token_id,
        pad_token_id=self.pad_token_id, architectures=[_HF_ARCH[self.model_type]])
    if self.model_type != "qwen2":
      kw["attention_bias"] = bool(self.qkv_bias)
    cfg = cls(**kw)
    cfg.dtype = self.param_dtype.name
    return cfg
