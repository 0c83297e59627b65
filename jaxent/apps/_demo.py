"""The embedded default: entropy collapse under GRPO and its cure, on a laptop.

A tiny Qwen2-architecture policy is warm-started by a short supervised phase
on the generated arithmetic task (``ab+cd+ef=`` -> ``S1;S2$``), then trained
from that same warm start with the same seeds by GRPO (PPO-clip), Clip-Cov
and KL-Cov through the real jaxent stack (grain data, on-device sampler,
exact grader, jitted train step, orbax checkpoints, TensorBoard). It writes
one run directory per method and seed, ``report.png`` and ``summary.json``.
See docs/DEMO.md for what was tuned and why.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax
import numpy as np
import optax

from jaxent import config as config_lib
from jaxent import rollout
from jaxent.train import StepSpec, build_components, make_sft_step, train

METHODS = {
    # name: config overrides on top of BASE
    "grpo": ["loss.name=ppo_clip"],
    # tuned on this toy (docs/DEMO.md): the paper's band (1, 5) holds ~6% of the tokens here
    "clip_cov": ["loss.name=clip_cov", "loss.ratio=0.1", "loss.cov_lb=0.75", "loss.cov_ub=5.0"],
    "kl_cov": ["loss.name=kl_cov", "loss.ratio=0.1", "loss.kl_coef=2.0"],
}

BASE: dict[str, Any] = {
    "name": "demo",
    # a tiny Qwen2: 2 layers, width 64, GQA 4/2 heads, SwiGLU 256, tied embeddings (~0.12M params)
    "model": {"arch": {"model_type": "qwen2", "hidden_size": 64, "num_layers": 2, "num_heads": 4,
                       "num_kv_heads": 2, "head_dim": 16, "intermediate_size": 256,
                       "tie_word_embeddings": True, "rope_theta": 10000.0}},
    # a+b+c+d+e= -> S1;S2;S3;S4$ (running sums of five one-digit numbers)
    "data": {"task": "arithmetic", "num_operands": 5, "num_digits": 1, "num_eval": 2048},
    "rollout": {"prompts_per_step": 32, "samples_per_prompt": 8, "max_new_tokens": 12,
                "temperature": 1.0, "reward": "exact_match"},   # the whole chain must be right
    "loss": {"clip_low": 0.2, "clip_high": 0.2},
    "optim": {"lr": 1e-4, "grad_clip": 1.0},
    "train": {"steps": 200, "ppo_epochs": 1, "mini_batches": 4, "eval_every": 20, "progress": False},
}


@dataclasses.dataclass(frozen=True)
class DemoSettings:
  rl_steps: int = 200          # RL steps per method and seed
  sft_steps: int = 1000        # supervised warm-start steps
  sft_batch: int = 64          # warm-start batch
  sft_lr: float = 3e-3         # warm-start peak learning rate (Adam, cosine)
  sft_noise: float = 0.2       # warm-start label noise per digit: a policy sure of little
  seeds: tuple[int, ...] = (0, 1)
  eval_every: int = 20         # held-out greedy evaluation period (RL steps)
  num_eval: int = 2048         # held-out prompts
  methods: tuple[str, ...] = ("grpo", "clip_cov", "kl_cov")
  early_fraction: float = 0.25  # the law fitted on this first part of the steps predicts the end


QUICK = DemoSettings(rl_steps=6, sft_steps=30, seeds=(0,), eval_every=3, num_eval=256)


def _noisy(answer: str, rng: np.random.Generator, noise: float) -> str:
  """Each digit replaced by a uniformly random digit with probability ``noise``."""
  chars = [c if not c.isdigit() or rng.random() >= noise else str(rng.integers(10)) for c in answer]
  return "".join(chars)


def _sft_batches(task, tok, n: int, seed: int, noise: float = 0.0, decoy=None):
  """Supervised pairs: prompt -> answer (``S1;S2$``), digits corrupted with prob ``noise``.

  The noise makes the warm start a policy that knows the answer but is not
  sure of it (its mode is right, its samples often are not), the situation
  of a pretrained model at the start of RL. ``decoy`` (a
  ``data.arithmetic.DecoyLabels``) replaces the answers of a subset of the
  problems by a wrong one with its probability, before the noise.
  """
  ops = task.sample_operands(n, seed=seed, unique=False)
  rng = np.random.default_rng(seed)
  prompts = [tok.encode(task.prompt(o)) for o in ops]
  label = task.answer if decoy is None else (lambda o: decoy.label(task, o, rng))
  answers = [tok.encode(_noisy(label(o), rng, noise)) for o in ops]
  r = max(len(a) for a in answers)
  toks = np.zeros((n, r), np.int32)
  mask = np.zeros((n, r), np.float32)
  for i, a in enumerate(answers):
    toks[i, :len(a)] = a
    mask[i, :len(a)] = 1
  batch, _ = rollout.assemble(prompts, toks, mask, np.zeros(n, np.float32), samples_per_prompt=1,
                              pad_id=tok.pad_token_id)
  return batch


def warm_start(cfg: config_lib.Config, model_config, params, settings: DemoSettings, *,
               log=print, chunk: int = 50, decoy=None):
  """Supervised warm start on the task; returns (params, final nll/token).

  ``settings`` supplies ``sft_steps``, ``sft_batch``, ``sft_lr`` and
  ``sft_noise`` (a ``DemoSettings`` or the study's settings); ``decoy`` (a
  ``data.arithmetic.DecoyLabels``) teaches a wrong answer on a subset.
  All batches are generated up front and ``chunk`` steps run per jitted
  ``lax.scan``, so the phase costs compute, not Python dispatch.
  """
  from jaxent.data.arithmetic import ArithmeticTask, CharTokenizer
  tok = CharTokenizer()
  task = ArithmeticTask(num_operands=cfg.data.num_operands, num_digits=cfg.data.num_digits)
  spec = StepSpec(model=model_config, loss=cfg.loss)
  sched = optax.warmup_cosine_decay_schedule(0.0, settings.sft_lr, min(50, settings.sft_steps // 5 + 1),
                                             settings.sft_steps, end_value=0.1 * settings.sft_lr)
  tx = optax.adam(sched)
  step = make_sft_step(spec, tx)

  @jax.jit
  def run_chunk(params, opt_state, batches):
    def body(carry, b):
      p, o = carry
      p, o, loss = step.__wrapped__(p, o, b)
      return (p, o), loss
    (params, opt_state), losses = jax.lax.scan(body, (params, opt_state), batches)
    return params, opt_state, losses

  n = settings.sft_steps * settings.sft_batch
  data = _sft_batches(task, tok, n, seed=10_000, noise=settings.sft_noise, decoy=decoy)
  params = jax.tree.map(lambda x: x.copy(), params)
  opt_state = tx.init(params)
  loss = float("nan")
  for start in range(0, settings.sft_steps, chunk):
    k = min(chunk, settings.sft_steps - start)
    rows = slice(start * settings.sft_batch, (start + k) * settings.sft_batch)
    b = jax.tree.map(lambda x: x[rows].reshape((k, settings.sft_batch) + x.shape[1:]), data)
    params, opt_state, losses = run_chunk(params, opt_state, rollout.to_device(b))
    loss = float(losses[-1])
    if (start + k) % 250 == 0 or start + k == settings.sft_steps:
      log(f"  warm start {start + k}/{settings.sft_steps}: nll/token {loss:.3f}")
  return params, loss


def _final_eval(evals: list[dict], k: int = 3) -> float:
  acc = [e["eval_accuracy"] for e in evals]
  return float(np.mean(acc[-k:])) if acc else float("nan")


def early_fit(runs: list[dict], total_steps: int, fraction: float = 0.25) -> dict:
  """The law fitted on the first ``fraction`` of the steps, pooled over seeds, against the end.

  Each run (a seed) gives points (training entropy at an evaluation step,
  held-out accuracy there); ``early_fit_prediction`` fits those at steps
  ``<= fraction * total_steps`` of every seed (OLS) and predicts each seed's
  last evaluation from its entropy there.

  Returns:
    ``early_fit_prediction``'s record (``predicted_final`` and
    ``realised_final`` are means over the seeds), or ``{"error_message": ...}``
    when the early window has fewer than 3 points or no evaluation follows it.
  """
  from jaxent.apps._law_report import early_fit_prediction
  pts = [(e["step"], r["entropy"][e["step"] - 1], e["eval_accuracy"])
         for r in runs for e in r["evals"]]
  ends = [(r["entropy"][r["evals"][-1]["step"] - 1], r["evals"][-1]["eval_accuracy"])
          for r in runs if r["evals"]]
  try:
    st, h, acc = zip(*pts) if pts else ((), (), ())
    return early_fit_prediction(st, h, acc, total_steps=total_steps, fraction=fraction,
                                final=tuple(zip(*ends)))
  except ValueError as e:
    return {"error_message": str(e)}


def run_demo(out_dir: str, *, quick: bool = False, settings: DemoSettings | None = None,
             log=print) -> dict:
  """Runs the demo and returns the summary (also written to ``summary.json``)."""
  from jaxent import diagnostics
  s = settings or (QUICK if quick else DemoSettings())
  t_start = time.perf_counter()
  os.makedirs(out_dir, exist_ok=True)
  base = json.loads(json.dumps(BASE))
  base["train"]["steps"] = s.rl_steps
  base["train"]["eval_every"] = s.eval_every
  base["data"]["num_eval"] = s.num_eval

  cfg0 = config_lib.from_dict(base, METHODS["grpo"])
  comps0 = build_components(cfg0, os.path.join(out_dir, "warmup"))
  log(f"jaxent demo: warm start ({s.sft_steps} supervised steps) ...")
  params0, nll = warm_start(cfg0, comps0.model_config, comps0.params, s, log=log)

  runs: dict[str, list[dict]] = {}
  for method in s.methods:
    for seed in s.seeds:
      cfg = config_lib.from_dict(base, METHODS[method] + [f"train.seed={seed}",
                                                         f"data.shuffle_seed={seed}", f"name={method}"])
      run_dir = os.path.join(out_dir, method, f"seed{seed}")
      comps = build_components(cfg, run_dir, params=params0)
      t0 = time.perf_counter()
      res = train(cfg, run_dir, comps, overwrite=True)  # a rerun moves the old one aside
      hist = res.history
      ent = [h["entropy"] for h in hist]
      runs.setdefault(method, []).append({
          "seed": seed, "run_dir": run_dir, "seconds": time.perf_counter() - t0,
          "entropy": ent, "evals": res.evals,
          "initial_entropy": float(np.mean(ent[:3])), "final_entropy": float(np.mean(ent[-10:])),
          "final_accuracy": _final_eval(res.evals)})
      r = runs[method][-1]
      log(f"  {method:9s} seed {seed}: entropy {r['initial_entropy']:.3f} -> {r['final_entropy']:.3f}, "
          f"held-out accuracy {r['final_accuracy']:.3f} ({r['seconds']:.0f} s)")

  summary: dict[str, Any] = {"settings": dataclasses.asdict(s), "warm_start_nll": nll, "methods": {}}
  for method, rs in runs.items():
    # entropy-performance law on (training entropy at eval step, held-out accuracy), pooled over seeds
    xs, ys = [], []
    for r in rs:
      for e in r["evals"]:
        xs.append(r["entropy"][e["step"] - 1])
        ys.append(e["eval_accuracy"])
    law = None
    try:
      fit = diagnostics.fit_entropy_law(np.asarray(xs), np.asarray(ys))
      law = {"a": float(fit.a), "b": float(fit.b), "r2": float(fit.r2), "ceiling": float(fit.ceiling)}
    except ValueError as e:
      law = {"error": str(e)}
    summary["methods"][method] = {
        "initial_entropy": float(np.mean([r["initial_entropy"] for r in rs])),
        "final_entropy": float(np.mean([r["final_entropy"] for r in rs])),
        "final_accuracy": float(np.mean([r["final_accuracy"] for r in rs])),
        "per_seed": [{k: r[k] for k in ("seed", "initial_entropy", "final_entropy", "final_accuracy",
                                        "seconds", "run_dir")} for r in rs],
        "law": law,
        "early_fit": early_fit(rs, s.rl_steps, s.early_fraction),
    }
    ef = summary["methods"][method]["early_fit"]
    if "predicted_final" in ef:
      log(f"  {method:9s} early fit (steps <= {s.early_fraction:g} x {s.rl_steps}, {ef['n_fit']} "
          f"points): predicts held-out accuracy {ef['predicted_final']:.3f} at the final entropy, "
          f"reached {ef['realised_final']:.3f} (ceiling {ef['ceiling']:.3f})")
  m = summary["methods"]
  if "grpo" in m:
    g = m["grpo"]
    summary["checks"] = {
        "grpo_entropy_ratio": g["final_entropy"] / g["initial_entropy"],
        **{f"{k}_entropy_vs_grpo": m[k]["final_entropy"] / g["final_entropy"] for k in m if k != "grpo"},
        **{f"{k}_accuracy_minus_grpo": m[k]["final_accuracy"] - g["final_accuracy"] for k in m if k != "grpo"},
    }
  summary["seconds"] = time.perf_counter() - t_start
  with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=2)
  _report(out_dir, runs, summary)
  log(f"jaxent demo: wrote {out_dir}/summary.json and report.png in {summary['seconds']:.0f} s")
  return summary


def _report(out_dir: str, runs: dict, summary: dict) -> None:
  """report.png: entropy by step, held-out accuracy by step, accuracy vs entropy with the law."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  colors = {"grpo": "tab:red", "clip_cov": "tab:blue", "kl_cov": "tab:green"}
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
  for method, rs in runs.items():
    c = colors.get(method, None)
    for i, r in enumerate(rs):
      lab = method if i == 0 else None
      axes[0].plot(np.arange(1, len(r["entropy"]) + 1), r["entropy"], color=c, alpha=0.8, label=lab)
      st = [e["step"] for e in r["evals"]]
      ac = [e["eval_accuracy"] for e in r["evals"]]
      axes[1].plot(st, ac, "o-", color=c, alpha=0.8, label=lab, ms=3)
      axes[2].scatter([r["entropy"][t - 1] for t in st], ac, color=c, s=12, alpha=0.8, label=lab)
    law = summary["methods"][method].get("law") or {}
    h = np.linspace(min(min(r["entropy"]) for r in rs), max(max(r["entropy"]) for r in rs), 50)
    if "a" in law:
      axes[2].plot(h, -law["a"] * np.exp(h) + law["b"], "--", color=c)
    ef = summary["methods"][method].get("early_fit") or {}
    if "a" in ef:  # the early fit extrapolated, and what it predicted for the end
      axes[2].plot(h, -ef["a"] * np.exp(h) + ef["b"], ":", color=c, lw=2,
                   label=f"{method} early fit ({ef['n_fit']} pts)")
      axes[2].scatter([ef["last_entropy"]], [ef["predicted_final"]], marker="x", s=60, color=c)
  axes[0].set(xlabel="RL step", ylabel="policy entropy (nats/token)", title="Entropy")
  axes[1].set(xlabel="RL step", ylabel="held-out accuracy (greedy)", title="Held-out accuracy")
  axes[2].set(xlabel="policy entropy", ylabel="held-out accuracy",
              title="R = -a exp(H) + b (dotted: early fit; x: its prediction)")
  for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "report.png"), dpi=110)
  plt.close(fig)
