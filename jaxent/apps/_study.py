"""``jaxent study``: every entropy-management method on one table.

From one supervised warm start (the demo's, ``_demo.warm_start``), the same
seeds and the same budget, each method of a study file (``configs/study/``)
is trained through the real trainer (``train.train``: each run directory is
an ordinary jaxent run directory). The policy is checkpointed at every
evaluation step; after the run each checkpoint is evaluated on the held-out
problems, greedy and under sampling at the training temperature (mean@k),
and the final policy for pass@k. Per method the study records the entropy
curve, the accuracies, pass@k, the law ``R = -a*exp(H) + b`` fitted to
(training entropy, sampled held-out accuracy), the law fitted on the first
quarter of the steps against the accuracy reached, the covariance
statistics, wall time and tokens generated. It writes ``study.json``,
``study.md`` and ``entropy.png``, ``accuracy.png``, ``law.png``,
``passk.png``.

Each finished run leaves ``study_run.json`` in its run directory (written
last, atomically); ``resume=True`` reuses every run whose record matches the
run's settings, and the warm start's parameters, so a killed study redoes
only what had not finished.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from typing import Any, Callable, Mapping

import numpy as np

STUDY_FILE = os.path.join("configs", "study", "study.yaml")
RUN_RECORD = "study_run.json"
_EVAL_ROWS = 256  # rows per sampler call in the held-out evaluations


@dataclasses.dataclass(frozen=True)
class StudySettings:
  """The budget and the measurements of a study (``settings`` in the study file)."""
  rl_steps: int = 200
  sft_steps: int = 1000
  sft_batch: int = 64
  sft_lr: float = 3e-3
  sft_noise: float = 0.2
  decoy: Mapping[str, Any] | None = None   # data.arithmetic.make_decoy settings, or None
  seeds: tuple[int, ...] = (0, 1, 2)
  eval_every: int = 25
  num_eval: int = 512
  eval_k: int = 4
  passk_max: int = 64
  passk_prompts: int = 128
  early_fraction: float = 0.25

  def validate(self) -> "StudySettings":
    for name in ("rl_steps", "sft_steps", "sft_batch", "eval_every", "num_eval", "eval_k",
                 "passk_max", "passk_prompts"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"study settings.{name} must be an int >= 1, got {v!r}")
    if self.eval_every > self.rl_steps:
      raise ValueError(f"study settings.eval_every ({self.eval_every}) must be <= rl_steps "
                       f"({self.rl_steps})")
    if not self.seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                 for s in self.seeds):
      raise ValueError(f"study settings.seeds must be a non-empty list of ints >= 0, got "
                       f"{list(self.seeds)!r}")
    if not 0 < self.early_fraction < 1:
      raise ValueError(f"study settings.early_fraction must be in (0, 1), got {self.early_fraction!r}")
    if self.decoy is not None:
      self.decoy_labels()
    return self

  def decoy_labels(self):
    """The warm start's decoy (``data.arithmetic.make_decoy``), or None."""
    from jaxent.data.arithmetic import make_decoy
    try:
      return make_decoy(self.decoy)
    except (TypeError, ValueError) as e:
      raise ValueError(f"study settings.decoy: {e}") from None

  @property
  def eval_steps(self) -> list[int]:
    """The steps whose policy is evaluated: 0 (the warm start), every ``eval_every``, the last."""
    return sorted({0, *range(self.eval_every, self.rl_steps + 1, self.eval_every), self.rl_steps})

  @property
  def passk_ks(self) -> list[int]:
    """1, 2, 4, ... up to ``passk_max`` (and ``passk_max`` itself)."""
    ks = [1 << i for i in range(int(math.log2(self.passk_max)) + 1)]
    return sorted(set(ks) | {self.passk_max})


@dataclasses.dataclass(frozen=True)
class StudyPlan:
  """A study file resolved: the settings, the shared overrides, each method's overrides."""
  settings: StudySettings
  base: dict[str, Any]
  methods: dict[str, dict[str, Any]]
  path: str


def default_study_file() -> str:
  """``configs/study/study.yaml`` of the working directory, else of the source tree."""
  if os.path.isfile(STUDY_FILE):
    return STUDY_FILE
  here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  return os.path.join(here, STUDY_FILE)


def _settings(data: Mapping[str, Any], where: str) -> dict[str, Any]:
  names = {f.name for f in dataclasses.fields(StudySettings)}
  unknown = sorted(set(data) - names)
  if unknown:
    raise ValueError(f"{where}: unknown setting(s) {unknown}; known: {sorted(names)}")
  out = dict(data)
  if "seeds" in out:
    out["seeds"] = tuple(out["seeds"]) if isinstance(out["seeds"], (list, tuple)) else out["seeds"]
  return out


def load_plan(path: str | None = None, *, quick: bool = False,
              methods: list[str] | None = None, seeds: list[int] | None = None) -> StudyPlan:
  """Reads a study file; ``quick`` applies its ``quick`` and ``quick_base`` sections.

  Every method's config is built and validated here, before any work.

  Raises:
    ValueError: an unreadable file, an unknown section, setting or method, or
      a method whose config does not validate (named).
  """
  import yaml
  from jaxent import config as config_lib
  path = path or default_study_file()
  try:
    with open(path, encoding="utf-8") as f:
      data = yaml.safe_load(f)
  except OSError as e:
    raise ValueError(f"cannot read the study file {path}: {e.strerror or e}") from None
  except yaml.YAMLError as e:
    raise ValueError(f"study file {path} is not valid YAML: {e}") from None
  if not isinstance(data, dict):
    raise ValueError(f"study file {path}: expected a mapping with settings and methods")
  known = {"settings", "quick", "base", "quick_base", "methods"}
  if set(data) - known:
    raise ValueError(f"study file {path}: unknown section(s) {sorted(set(data) - known)}; "
                     f"known: {sorted(known)}")
  kw = _settings(data.get("settings") or {}, f"{path} settings")
  base = dict(data.get("base") or {})
  if quick:
    kw.update(_settings(data.get("quick") or {}, f"{path} quick"))
    base.update(data.get("quick_base") or {})
  if seeds:
    kw["seeds"] = tuple(seeds)
  all_methods = data.get("methods") or {}
  if not isinstance(all_methods, dict) or not all_methods:
    raise ValueError(f"study file {path}: 'methods' must map method names to config overrides")
  chosen = list(methods) if methods else list(all_methods)
  missing = [m for m in chosen if m not in all_methods]
  if missing:
    raise ValueError(f"unknown method(s) {missing}; {path} has: {', '.join(all_methods)}")
  settings = StudySettings(**kw).validate()
  plan = StudyPlan(settings=settings, base=base,
                   methods={m: dict(all_methods[m] or {}) for m in chosen}, path=path)
  for m in chosen:
    try:
      run_config(plan, m, settings.seeds[0])
    except (ValueError, config_lib.ConfigError) as e:
      raise ValueError(f"study method {m!r}: {e}") from None
  return plan


def _set_dotted(data: dict, key: str, value) -> None:
  node = data
  parts = str(key).split(".")
  for p in parts[:-1]:
    nxt = node.get(p)
    if not isinstance(nxt, dict):
      nxt = node[p] = {}
    node = nxt
  node[parts[-1]] = value


def run_config(plan: StudyPlan, method: str, seed: int):
  """The config of one run: the demo's base, the study's overrides, the method's, the budget."""
  from jaxent import config as config_lib
  from jaxent.apps._demo import BASE
  s = plan.settings
  data = json.loads(json.dumps(BASE))
  for k, v in {**plan.base, **plan.methods[method]}.items():
    _set_dotted(data, k, v)
  n_ckpt = len(s.eval_steps) + 1
  for k, v in {"train.steps": s.rl_steps, "train.eval_every": 0, "train.ckpt_every": s.eval_every,
               "train.keep_checkpoints": n_ckpt, "train.seed": seed, "data.shuffle_seed": seed,
               "data.num_eval": s.num_eval, "name": method, "train.progress": False}.items():
    _set_dotted(data, k, v)
  return config_lib.from_dict(data)


def _signature(obj) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _write_json(path: str, obj) -> None:
  """Atomically: a kill leaves the old file or the new one, never half of one."""
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2, allow_nan=False, default=_json_default)
  os.replace(tmp, path)


def _json_default(o):
  if isinstance(o, (np.floating, np.integer)):
    return o.item()
  if isinstance(o, tuple):
    return list(o)
  raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _clean(x):
  """NaN/inf -> None, recursively (JSON has no NaN)."""
  if isinstance(x, dict):
    return {k: _clean(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_clean(v) for v in x]
  if isinstance(x, (float, np.floating)):
    return float(x) if math.isfinite(x) else None
  return x


# ------------------------------------------------------------ warm start ---

def _warm_start(plan: StudyPlan, out_dir: str, *, resume: bool, log) -> tuple[Any, Any, dict]:
  """(params, components of a probe run, record): trained, or read back under ``resume``."""
  import jax
  from jaxent.apps._demo import warm_start
  from jaxent.train import build_components
  s = plan.settings
  cfg = run_config(plan, next(iter(plan.methods)), s.seeds[0])
  wdir = os.path.join(out_dir, "warmstart")
  os.makedirs(wdir, exist_ok=True)
  comps = build_components(cfg, wdir)
  sig = _signature({"model": dataclasses.asdict(cfg.model), "data": dataclasses.asdict(cfg.data),
                    "sft": [s.sft_steps, s.sft_batch, s.sft_lr, s.sft_noise, s.decoy],
                    "loss": dataclasses.asdict(cfg.loss)["agg"]})
  rec_path, npz = os.path.join(wdir, "warmstart.json"), os.path.join(wdir, "params.npz")
  leaves, treedef = jax.tree_util.tree_flatten(comps.params)
  if resume and os.path.isfile(rec_path) and os.path.isfile(npz):
    with open(rec_path, encoding="utf-8") as f:
      rec = json.load(f)
    if rec.get("signature") == sig:
      with np.load(npz) as z:
        loaded = [z[f"p{i}"] for i in range(len(leaves))]
      log(f"jaxent study: warm start read back from {wdir}")
      return _on_one_device(jax.tree_util.tree_unflatten(treedef, loaded)), comps, rec
    log("jaxent study: the stored warm start has other settings: training it again")
  log(f"jaxent study: warm start ({s.sft_steps} supervised steps) ...")
  t0 = time.perf_counter()
  params, nll = warm_start(cfg, comps.model_config, comps.params, s, log=log,
                           decoy=s.decoy_labels())
  tmp = f"{npz}.tmp-{os.getpid()}.npz"
  np.savez(tmp, **{f"p{i}": np.asarray(x) for i, x in enumerate(jax.tree_util.tree_leaves(params))})
  os.replace(tmp, npz)
  rec = {"signature": sig, "nll": float(nll), "seconds": time.perf_counter() - t0}
  _write_json(rec_path, rec)
  return _on_one_device(params), comps, rec


def _on_one_device(params):
  """``params`` on this process's first device, laid out as ``train.load_run`` restores a
  checkpoint: the warm start and the checkpoints then share the evaluation's compiled programs."""
  import jax
  from jax.sharding import SingleDeviceSharding
  return jax.device_put(params, SingleDeviceSharding(jax.local_devices()[0]))


# ------------------------------------------------------------ evaluation ---

class _Evaluator:
  """Held-out greedy accuracy, mean@k at the training temperature, and pass@k of a policy."""

  def __init__(self, comps, cfg, settings: StudySettings):
    from jaxent import rollout
    from jaxent.data.arithmetic import CharTokenizer, operands_of_prompt
    self.comps, self.s = comps, settings
    self.engine = rollout.SamplerEngine()
    self.prompts, self.answers = comps.eval_set
    self.temperature = cfg.rollout.temperature
    self.max_new = cfg.rollout.max_new_tokens
    decoy = settings.decoy_labels()
    self.subset = None
    if decoy is not None:  # the decoy's subset of the held-out problems
      tok = CharTokenizer()
      ops = np.asarray([operands_of_prompt(tok.decode(p)) for p in self.prompts])
      self.subset = decoy.applies(ops)

  def _grade(self, model, prompts, answers, *, k: int, temperature: float, key):
    from jaxent import eval as eval_lib
    from jaxent import rollout
    from jaxent.rewards import is_correct
    task = self.comps.task
    dec = rollout.Decoding(max_new_tokens=self.max_new, temperature=temperature, eos_id=task.eos_id)
    s = eval_lib.sample_and_grade(self.engine, model, prompts, answers, dec, k=k, grade=task.grade,
                                  decode=task.decode, key=key, batch_size=_EVAL_ROWS)
    return is_correct(s.rewards)  # bool [N, k]

  def __call__(self, model, *, seed: int, step: int, passk: bool) -> dict:
    import jax
    from jaxent import eval as eval_lib
    key = jax.random.fold_in(jax.random.PRNGKey(seed), 7919 + step)
    kg, ks, kp = jax.random.split(key, 3)
    greedy = self._grade(model, self.prompts, self.answers, k=1, temperature=0.0, key=kg)
    sampled = self._grade(model, self.prompts, self.answers, k=self.s.eval_k,
                          temperature=self.temperature, key=ks)
    out = {"step": step, "greedy_accuracy": float(greedy.mean()), "accuracy": float(sampled.mean())}
    if self.subset is not None and self.subset.any() and (~self.subset).any():
      for name, rows in (("decoy", self.subset), ("other", ~self.subset)):
        out[f"greedy_accuracy_{name}"] = float(greedy[rows].mean())
        out[f"accuracy_{name}"] = float(sampled[rows].mean())
    if passk:
      n = min(self.s.passk_prompts, len(self.prompts))
      if self.s.passk_max == self.s.eval_k:  # the mean@k samples serve (no second program)
        c = sampled[:n]
      else:
        c = self._grade(model, self.prompts[:n], self.answers[:n], k=self.s.passk_max,
                        temperature=self.temperature, key=kp)
      out["passk"] = {str(k): eval_lib.pass_at_k(c, k) for k in self.s.passk_ks}
      if self.subset is not None and self.subset[:n].any():
        out["passk_decoy"] = {str(k): eval_lib.pass_at_k(c[self.subset[:n]], k)
                              for k in self.s.passk_ks}
    return out


# ------------------------------------------------------------------ runs ---

def _entropy_at(history_entropy: list[float], step: int) -> float:
  """The policy entropy after ``step`` updates: measured on step ``step + 1``'s rollout (the
  last step's own rollout for the final policy)."""
  return float(history_entropy[min(step, len(history_entropy) - 1)])


def _cov_stats(history: list[dict], quarter: int) -> dict:
  out = {}
  for key in ("cov", "cov_p99", "cov_frac_pos", "selected_frac"):
    vals = [h.get(key) for h in history]
    if any(v is None for v in vals) or not vals:
      continue
    v = np.asarray(vals, np.float64)
    out[key] = {"first_quarter": float(v[:quarter].mean()), "last_quarter": float(v[-quarter:].mean()),
                "mean": float(v.mean())}
  return out


def _run_one(plan: StudyPlan, method: str, seed: int, out_dir: str, params0, evaluator: _Evaluator,
             step0: dict, *, resume: bool, warm_sig: str, log) -> tuple[dict, bool]:
  """One run (trained, evaluated, recorded), or its record read back; (record, reused)."""
  from jaxent import train as train_lib
  from jaxent.apps._law_report import early_fit_prediction
  s = plan.settings
  cfg = run_config(plan, method, seed)
  run_dir = os.path.join(out_dir, method, f"seed{seed}")
  sig = _signature({"config": dataclasses.asdict(cfg), "settings": dataclasses.asdict(s),
                    "warm": warm_sig})
  rec_path = os.path.join(run_dir, RUN_RECORD)
  if resume and os.path.isfile(rec_path):
    with open(rec_path, encoding="utf-8") as f:
      rec = json.load(f)
    if rec.get("signature") == sig:
      return rec, True
    log(f"jaxent study: {run_dir} was run with other settings: running it again")
  t0 = time.perf_counter()
  comps = train_lib.build_components(cfg, run_dir, params=params0)
  res = train_lib.train(cfg, run_dir, comps, overwrite=True)  # a rerun moves the old one aside
  train_s = time.perf_counter() - t0
  hist = res.history
  ent = [float(h["entropy"]) for h in hist]
  evals = [dict(step0, entropy=_entropy_at(ent, 0))]
  for step in s.eval_steps[1:]:
    _, model, _, _ = train_lib.load_run(run_dir, step)
    ev = evaluator(model, seed=seed, step=step, passk=step == s.rl_steps)
    ev["entropy"] = _entropy_at(ent, step)
    evals.append(ev)
  P, S = cfg.rollout.prompts_per_step, cfg.rollout.samples_per_prompt
  tokens = float(sum(h["response_len_mean"] * P * S * max(int(h.get("gen_batches", 1)), 1)
                     for h in hist))
  quarter = max(1, int(round(s.early_fraction * len(hist))))
  rec: dict[str, Any] = {
      "method": method, "seed": seed, "signature": sig, "run_dir": run_dir,
      "entropy": ent, "reward": [float(h["reward_mean"]) for h in hist], "evals": evals,
      "passk": evals[-1].get("passk"), "passk_decoy": evals[-1].get("passk_decoy"),
      "initial_entropy": float(np.mean(ent[:3])), "final_entropy": float(np.mean(ent[-max(1, len(ent) // 20):])),
      "final_accuracy": evals[-1]["accuracy"], "final_greedy_accuracy": evals[-1]["greedy_accuracy"],
      "cov": _cov_stats(hist, quarter), "train_seconds": train_s,
      "seconds": time.perf_counter() - t0, "tokens_generated": tokens,
  }
  for name in ("decoy", "other"):
    if f"accuracy_{name}" in evals[-1]:
      rec[f"final_accuracy_{name}"] = evals[-1][f"accuracy_{name}"]
      rec[f"final_greedy_accuracy_{name}"] = evals[-1][f"greedy_accuracy_{name}"]
  xs, ys = [e["entropy"] for e in evals], [e["accuracy"] for e in evals]
  rec["law"] = _law(xs, ys)
  try:
    rec["early_fit"] = early_fit_prediction([e["step"] for e in evals], xs, ys,
                                            total_steps=s.rl_steps, fraction=s.early_fraction)
  except ValueError as e:
    rec["early_fit"] = {"error": str(e)}
  _write_json(rec_path, _clean(rec))  # last: its presence marks the run finished
  return _clean(rec), False


def _law(xs, ys) -> dict:
  from jaxent import diagnostics
  try:
    fit = diagnostics.fit_entropy_law(np.asarray(xs), np.asarray(ys), labels=("entropy", "accuracy"))
  except ValueError as e:
    return {"error": str(e)}
  return {"a": fit.a, "b": fit.b, "r2": fit.r2, "ceiling": fit.ceiling, "n": fit.n_fit}


# --------------------------------------------------------------- summary ---

def _ms(vals) -> dict:
  """mean and (population over seeds) std, ignoring None."""
  v = np.asarray([x for x in vals if x is not None], np.float64)
  if v.size == 0:
    return {"mean": None, "std": None}
  return {"mean": float(v.mean()), "std": float(v.std())}


def summarise(plan: StudyPlan, runs: dict[str, list[dict]]) -> dict:
  """Per method, over seeds: means and standard deviations of every measurement."""
  s = plan.settings
  methods = {}
  for method, rs in runs.items():
    m: dict[str, Any] = {"seeds": [r["seed"] for r in rs], "run_dirs": [r["run_dir"] for r in rs]}
    for key in ("initial_entropy", "final_entropy", "final_accuracy", "final_greedy_accuracy",
                "final_accuracy_decoy", "final_accuracy_other", "final_greedy_accuracy_decoy",
                "seconds", "tokens_generated"):
      if all(key in r for r in rs):
        m[key] = _ms([r[key] for r in rs])
    m["entropy_ratio"] = _ms([r["final_entropy"] / r["initial_entropy"] for r in rs])
    if all(r.get("passk") for r in rs):
      m["passk"] = {k: _ms([r["passk"][k] for r in rs]) for k in rs[0]["passk"]}
    if all(r.get("passk_decoy") for r in rs):
      m["passk_decoy"] = {k: _ms([r["passk_decoy"][k] for r in rs]) for k in rs[0]["passk_decoy"]}
    xs = [e["entropy"] for r in rs for e in r["evals"]]
    ys = [e["accuracy"] for r in rs for e in r["evals"]]
    m["law"] = _clean(_law(xs, ys))            # pooled over the seeds
    m["law_r2_per_seed"] = _ms([r["law"].get("r2") for r in rs])
    ef = [r["early_fit"] for r in rs if "predicted_final" in r["early_fit"]]
    m["early_fit"] = {k: _ms([e[k] for e in ef]) for k in ("ceiling", "predicted_final",
                                                            "realised_final", "error", "r2")}
    m["early_fit"]["abs_error"] = _ms([abs(e["error"]) for e in ef])
    m["early_fit"]["failed"] = [r["early_fit"]["error"] for r in rs if "predicted_final" not in r["early_fit"]]
    m["cov"] = {k: {q: _ms([r["cov"][k][q] for r in rs]) for q in ("first_quarter", "last_quarter")}
                for k in rs[0]["cov"] if all(k in r["cov"] for r in rs)}
    methods[method] = m
  out: dict[str, Any] = {"settings": dataclasses.asdict(s), "study_file": plan.path,
                         "methods": methods}
  if "grpo" in methods:
    g = methods["grpo"]
    out["vs_grpo"] = {
        k: {"entropy_ratio": _div(m["final_entropy"]["mean"], g["final_entropy"]["mean"]),
            "accuracy_diff": _sub(m["final_accuracy"]["mean"], g["final_accuracy"]["mean"])}
        for k, m in methods.items() if k != "grpo"}
  return _clean(out)


def _div(a, b):
  return None if a is None or not b else a / b


def _sub(a, b):
  return None if a is None or b is None else a - b


# ----------------------------------------------------------------- table ---

def _fmt(ms: dict | None, digits: int = 3, std: bool = True) -> str:
  if not ms or ms.get("mean") is None:
    return "—"
  text = f"{ms['mean']:.{digits}f}"
  if std and ms.get("std"):
    text += f" ± {ms['std']:.{digits}f}"
  return text


TABLE_COLUMNS = ("method", "final H", "H / H0", "acc mean@k", "acc greedy", "pass@1", "pass@K",
                 "law a, b", "law R²", "early-fit pred.", "reached", "cov early → late",
                 "wall s", "tokens")


def table_rows(summary: dict) -> list[list[str]]:
  """The cells of study.md's table, from ``summary`` (study.json) alone."""
  kmax = str(summary["settings"]["passk_max"])
  rows = []
  for method, m in summary["methods"].items():
    law = m.get("law") or {}
    pk = m.get("passk") or {}
    cov = m.get("cov", {}).get("cov", {})
    rows.append([
        method, _fmt(m["final_entropy"]), _fmt(m["entropy_ratio"], 2),
        _fmt(m["final_accuracy"]), _fmt(m["final_greedy_accuracy"]),
        _fmt(pk.get("1")), _fmt(pk.get(kmax)),
        "—" if "a" not in law else f"{law['a']:.3f}, {law['b']:.3f}",
        "—" if law.get("r2") is None else f"{law['r2']:.2f}",
        _fmt(m["early_fit"]["predicted_final"]), _fmt(m["early_fit"]["realised_final"]),
        "—" if not cov else f"{_fmt(cov['first_quarter'], 4, False)} → {_fmt(cov['last_quarter'], 4, False)}",
        _fmt(m["seconds"], 0, False), _fmt(m["tokens_generated"], 0, False)])
  return rows


def write_table(path: str, summary: dict) -> None:
  s = summary["settings"]
  lines = [
      "# jaxent study", "",
      f"{len(s['seeds'])} seed(s) {list(s['seeds'])}, {s['rl_steps']} RL steps, warm start "
      f"{s['sft_steps']} supervised steps; held-out: {s['num_eval']} prompts, mean@{s['eval_k']} at the "
      f"training temperature and greedy; pass@K with K = {s['passk_max']} on {s['passk_prompts']} "
      f"prompts. Values are means ± seed standard deviation. The law R = -a·exp(H) + b is fitted "
      f"to (training entropy, sampled held-out accuracy) pooled over seeds; the early fit uses the "
      f"evaluations of the first {s['early_fraction']:g} of the steps and predicts the last one. "
      f"cov: the mean Cov(log π, A) of the first and last quarter of the steps.", "",
      "| " + " | ".join(TABLE_COLUMNS) + " |",
      "|" + "|".join(" --- " for _ in TABLE_COLUMNS) + "|"]
  lines += ["| " + " | ".join(r) + " |" for r in table_rows(summary)]
  decoy = [(k, m) for k, m in summary["methods"].items() if "final_accuracy_decoy" in m]
  if decoy:
    lines += ["", "Decoy subset (the problems the warm start answers wrongly on purpose):", "",
              "| method | acc mean@k (decoy) | acc mean@k (other) | greedy (decoy) | pass@K (decoy) |",
              "| --- | --- | --- | --- | --- |"]
    kmax = str(s["passk_max"])
    for k, m in decoy:
      lines.append(f"| {k} | {_fmt(m['final_accuracy_decoy'])} | {_fmt(m.get('final_accuracy_other'))} | "
                   f"{_fmt(m.get('final_greedy_accuracy_decoy'))} | "
                   f"{_fmt((m.get('passk_decoy') or {}).get(kmax))} |")
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")


# --------------------------------------------------------------- figures ---

def _figures(out_dir: str, runs: dict[str, list[dict]], summary: dict) -> None:
  """entropy.png, accuracy.png, law.png, passk.png (matplotlib's Agg canvas, no pyplot)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  colors = {m: f"C{i % 10}" for i, m in enumerate(runs)}

  def save(fig, name):
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, name), dpi=100)

  fig = Figure(figsize=(7, 4.5))
  ax = fig.add_subplot()
  for m, rs in runs.items():
    for i, r in enumerate(rs):
      ax.plot(np.arange(1, len(r["entropy"]) + 1), r["entropy"], color=colors[m], alpha=0.8,
              label=m if i == 0 else None)
  ax.set(xlabel="RL step", ylabel="policy entropy (nats/token)", title="Entropy")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  save(fig, "entropy.png")

  fig = Figure(figsize=(12, 4.5))
  axes = fig.subplots(1, 2)
  for m, rs in runs.items():
    for i, r in enumerate(rs):
      st = [e["step"] for e in r["evals"]]
      axes[0].plot(st, [e["accuracy"] for e in r["evals"]], "o-", ms=3, color=colors[m],
                   label=m if i == 0 else None)
      axes[1].plot(st, [e["greedy_accuracy"] for e in r["evals"]], "o-", ms=3, color=colors[m],
                   label=m if i == 0 else None)
  k = summary["settings"]["eval_k"]
  axes[0].set(xlabel="RL step", ylabel=f"held-out accuracy, mean@{k}", title="Sampled (training T)")
  axes[1].set(xlabel="RL step", ylabel="held-out accuracy, greedy", title="Greedy")
  for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  save(fig, "accuracy.png")

  n = len(runs)
  cols = min(3, n)
  rows_ = (n + cols - 1) // cols
  fig = Figure(figsize=(4.5 * cols, 3.8 * rows_))
  axes = np.atleast_1d(fig.subplots(rows_, cols)).reshape(-1)
  for ax, (m, rs) in zip(axes, runs.items()):
    hmax = max(e["entropy"] for r in rs for e in r["evals"])
    for r in rs:
      ef = r["early_fit"]
      k_fit = ef.get("n_fit", 0)
      xs = [e["entropy"] for e in r["evals"]]
      ys = [e["accuracy"] for e in r["evals"]]
      ax.scatter(xs[:k_fit], ys[:k_fit], color=colors[m], s=16)
      ax.scatter(xs[k_fit:], ys[k_fit:], facecolors="none", edgecolors=colors[m], s=16)
      if "a" in ef:
        h = np.linspace(0.0, hmax * 1.05, 60)
        ax.plot(h, -ef["a"] * np.exp(h) + ef["b"], "--", color=colors[m], lw=1)
        ax.plot([ef["last_entropy"]], [ef["predicted_final"]], "x", color="k")
    ax.set(title=m, xlabel="training entropy H", ylabel="held-out accuracy (mean@k)")
    ax.grid(alpha=0.3)
  for ax in axes[n:]:
    ax.set_visible(False)
  fig.suptitle("R = -a exp(H) + b fitted on the first quarter (filled), extrapolated (dashed); "
               "x: predicted final", fontsize=9)
  save(fig, "law.png")

  fig = Figure(figsize=(7, 4.5))
  ax = fig.add_subplot()
  for m, mm in summary["methods"].items():
    pk = mm.get("passk")
    if not pk:
      continue
    ks = sorted(int(k) for k in pk)
    ax.plot(ks, [pk[str(k)]["mean"] for k in ks], "o-", ms=3, color=colors[m], label=m)
  if summary.get("warm_start", {}).get("passk"):
    pk = summary["warm_start"]["passk"]
    ks = sorted(int(k) for k in pk)
    ax.plot(ks, [pk[str(k)] for k in ks], "k:", label="warm start")
  ax.set_xscale("log", base=2)
  ax.set(xlabel="k", ylabel="pass@k (held-out)", title="pass@k of the final policies")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  save(fig, "passk.png")


# ------------------------------------------------------------------ main ---

def run_study(out_dir: str, *, study_file: str | None = None, quick: bool = False,
              methods: list[str] | None = None, seeds: list[int] | None = None,
              resume: bool = False, log: Callable[[str], None] = print,
              progress: bool = True) -> dict:
  """Runs (or resumes) a study and returns its summary (also ``study.json``)."""
  from jaxent import models
  plan = load_plan(study_file, quick=quick, methods=methods, seeds=seeds)
  s = plan.settings
  t_start = time.perf_counter()
  os.makedirs(out_dir, exist_ok=True)
  params0, comps0, warm = _warm_start(plan, out_dir, resume=resume, log=log)
  cfg0 = run_config(plan, next(iter(plan.methods)), s.seeds[0])
  evaluator = _Evaluator(comps0, cfg0, s)
  warm_model = models.Model(params=params0, config=comps0.model_config)
  step0_path = os.path.join(out_dir, "warmstart", "evals.json")
  step0_all = {}
  if resume and os.path.isfile(step0_path):
    with open(step0_path, encoding="utf-8") as f:
      stored = json.load(f)
    if stored.get("signature") == warm["signature"] + _signature(dataclasses.asdict(s)):
      step0_all = stored["evals"]
  for seed in s.seeds:  # the warm start's evaluation, shared by every method of a seed
    if str(seed) not in step0_all:
      step0_all[str(seed)] = evaluator(warm_model, seed=seed, step=0, passk=True)
  _write_json(step0_path, {"signature": warm["signature"] + _signature(dataclasses.asdict(s)),
                           "evals": step0_all})

  jobs = [(m, seed) for m in plan.methods for seed in s.seeds]
  runs: dict[str, list[dict]] = {m: [] for m in plan.methods}
  from tqdm import tqdm
  bar = tqdm(total=len(jobs), desc="jaxent study", unit="run", disable=not progress,
             dynamic_ncols=True)
  try:
    for method, seed in jobs:
      bar.set_postfix_str(f"{method} seed {seed}")
      step0 = {k: v for k, v in step0_all[str(seed)].items() if k not in ("passk", "passk_decoy")}
      rec, reused = _run_one(plan, method, seed, out_dir, params0, evaluator, step0, resume=resume,
                             warm_sig=warm["signature"], log=log)
      runs[method].append(rec)
      bar.update(1)
      bar.write(f"  {method:16s} seed {seed}: "
                + ("finished before (reused)" if reused else
                   f"entropy {rec['initial_entropy']:.3f} -> {rec['final_entropy']:.3f}, held-out "
                   f"mean@{s.eval_k} {rec['final_accuracy']:.3f}, greedy "
                   f"{rec['final_greedy_accuracy']:.3f} ({rec['seconds']:.0f} s)"))
  finally:
    bar.close()

  summary = summarise(plan, runs)
  ws = step0_all[str(s.seeds[0])]
  summary["warm_start"] = _clean({"nll": warm.get("nll"), "seconds": warm.get("seconds"),
                                  "accuracy": ws["accuracy"], "greedy_accuracy": ws["greedy_accuracy"],
                                  "passk": ws.get("passk"), "passk_decoy": ws.get("passk_decoy")})
  summary["seconds"] = time.perf_counter() - t_start
  summary["runs"] = {m: [{k: r[k] for k in ("seed", "run_dir", "final_entropy", "final_accuracy",
                                              "final_greedy_accuracy", "seconds")} for r in rs]
                     for m, rs in runs.items()}
  _write_json(os.path.join(out_dir, "study.json"), summary)
  write_table(os.path.join(out_dir, "study.md"), summary)
  _figures(out_dir, runs, summary)
  log(f"jaxent study: wrote {out_dir}/study.json, study.md and the figures in "
      f"{summary['seconds']:.0f} s")
  return summary
