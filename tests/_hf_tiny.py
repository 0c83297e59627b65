"""Tiny random Hugging Face checkpoints for tests (built locally, never downloaded)."""
from __future__ import annotations

import torch
import transformers

# Shared tiny shapes: 2 layers, hidden 64, GQA 4 query / 2 kv heads.
_BASE = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
             rms_norm_eps=1e-6)

FAMILIES = {
    # Qwen2.5: q/k/v bias, theta 1e6, untied
    "qwen2": lambda: transformers.Qwen2Config(
        **_BASE, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
    # Qwen2.5-0.5B-style tied embeddings
    "qwen2_tied": lambda: transformers.Qwen2Config(
        **_BASE, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
    # Llama 3.1: llama3 RoPE scaling (original context 16 so it bends our short
    # positions' low frequencies), untied
    "llama3": lambda: transformers.LlamaConfig(
        **_BASE, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 16}),
    # SmolLM2: llama arch, no bias, GQA, tied
    "smollm2": lambda: transformers.LlamaConfig(
        **_BASE, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1e5}),
    # Qwen3: per-head q/k RMSNorm, head_dim != hidden / heads
    "qwen3": lambda: transformers.Qwen3Config(
        **_BASE, head_dim=24, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
}


def make_torch_model(hf_config, seed: int = 0, std: float = 0.15):
  """A float32 ``AutoModelForCausalLM`` with every parameter ~ N(0, std^2).

  Norm scales and biases are randomized too (HF initializes them to 1 / 0,
  which would hide a mapping error in those tensors).
  """
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + std * torch.randn_like(p))
      else:
        p.normal_(0.0, std)
  return model.eval()


def torch_logits(model, tokens, attention_mask=None, position_ids=None):
  """float32 NumPy logits of the PyTorch model."""
  kw = {}
  if attention_mask is not None:
    kw["attention_mask"] = torch.as_tensor(attention_mask, dtype=torch.long)
  if position_ids is not None:
    kw["position_ids"] = torch.as_tensor(position_ids, dtype=torch.long)
  with torch.no_grad():
    return model(torch.as_tensor(tokens, dtype=torch.long), **kw).logits.float().numpy()


def assert_remat_grads_match_torch(tm, m, tokens, mask, directory) -> None:
  """Gradients of ``Σ mask · log p(token 1)`` under ``jax.checkpoint`` equal torch autograd's.

  torch's gradients are mapped to jaxent's layout by writing them as a
  checkpoint (``directory``) and loading it with ``models.from_pretrained``
  (a tied ``lm_head.weight`` is left out: it is the embedding's gradient).
  """
  import os

  import jax
  import jax.numpy as jnp
  import numpy as np
  from safetensors.numpy import save_file

  from jaxent import models
  tm.zero_grad()
  logits = tm(torch.as_tensor(tokens, dtype=torch.long),
              attention_mask=torch.as_tensor(mask)).logits
  (torch.log_softmax(logits, -1)[..., 1] * torch.as_tensor(mask)).sum().backward()
  grads = {k: p.grad.numpy() for k, p in tm.state_dict(keep_vars=True).items()
           if not (k == "lm_head.weight" and tm.config.tie_word_embeddings)}
  with open(os.path.join(directory, "config.json"), "w") as f:
    f.write(tm.config.to_json_string())
  save_file(grads, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
  ref = models.from_pretrained(directory).params

  def loss(params, cfg):
    logits, _ = models.apply(cfg, params, tokens, attention_mask=mask)
    return jnp.sum(jax.nn.log_softmax(logits)[..., 1] * mask)

  g = jax.jit(jax.grad(loss), static_argnums=1)(m.params, m.config.replace(remat=True))
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max(),
                               err_msg=jax.tree_util.keystr(path))
