"""Loading what a run wrote, for evaluation and export: its config, mesh and parameters.

``load_run`` restores only the parameters of a checkpoint (an orbax partial
restore, straight into their layout on a mesh); ``load_model_or_run`` takes a
Hugging Face directory or a run directory; ``eval_mesh`` chooses the mesh to
evaluate either on.
"""
from __future__ import annotations

import os
from typing import Sequence

import jax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, SingleDeviceSharding

from jaxent import config as config_lib
from jaxent import models, sharding
from jaxent.config import Config
from jaxent.errors import ConfigError, SetupError
from jaxent.train._build import load_policy, model_config
from jaxent.train._checkpoint import check_manifest, nonfinite_leaves


def _read_run_config(run_dir: str) -> Config:
  cfg_path = os.path.join(run_dir, "config.yaml")
  if not os.path.isfile(cfg_path):
    raise SetupError(f"{run_dir} is not a run directory: {cfg_path} is missing")
  return config_lib.load(cfg_path)


def model_config_of(path: str, dtype: str = "float32"):
  """(model config, run config or None) of a HF or run directory; reads no weights."""
  if os.path.isfile(os.path.join(path, "config.yaml")):
    cfg = _read_run_config(path)
    return model_config(cfg), cfg
  if os.path.isfile(os.path.join(path, "config.json")):
    try:
      return models.load_config(path, dtype=dtype), None
    except (FileNotFoundError, ValueError, OSError) as e:
      raise SetupError(f"cannot load {path}: {e}") from e
  raise SetupError(f"{path} is neither a Hugging Face directory (config.json) nor a jaxent run "
                   f"directory (config.yaml)")


def eval_mesh(path: str, shape: Sequence[int] | None = None, *, dtype: str = "float32",
              what: str = "--mesh") -> tuple[Mesh | None, str | None]:
  """The mesh to evaluate ``path`` on, and a note for the user (or None).

  ``shape`` (``parse_mesh``) is checked against this job's devices and the
  model's heads (``sharding.plan_shape``: the product must equal the devices,
  or with one process divide them; ``tensor`` must divide the attention and
  KV heads). Without it, a run directory uses its own ``mesh:`` section, as
  ``jaxent train`` planned it (``sharding.plan_mesh``: the mesh it trained on)
  when that fits the devices here, else one device (with a note); a HF
  directory uses one device. With several processes a mesh over every
  device is required. Returns ``(None, note)`` for one device.

  Raises:
    ConfigError: ``shape`` does not fit (the message starts with ``what``);
      SetupError: an unreadable model directory.
  """
  mcfg, run_cfg = model_config_of(path, dtype)
  n, procs = jax.device_count(), jax.process_count()
  if shape is not None:
    plan = sharding.plan_shape(shape, n, process_count=procs, model_config=mcfg, what=what)
  elif run_cfg is not None:
    try:
      plan = sharding.plan_mesh(run_cfg, n, process_count=procs, model_config=mcfg)
    except ConfigError as e:
      if procs > 1:
        raise ConfigError(f"the run's mesh does not fit this job ({e}); give {what} over all "
                          f"{n} devices, e.g. {what} fsdp={n}") from e
      return None, (f"the run's mesh does not fit the {n} devices here ({e}); evaluating on one "
                    f"device (give {what} to choose a mesh)")
  else:
    if procs > 1:
      raise ConfigError(f"{procs} processes evaluate on one mesh: give {what} over all {n} "
                        f"devices, e.g. {what} fsdp={n}")
    return None, None
  if plan.size == 1:
    return None, plan.note
  return plan.make_mesh(), plan.note


def _restore_params(ck_dir: str, step: int | None, abstract_params):
  """(params, step): only the params of checkpoint ``step`` (default: the latest), as laid out
  by ``abstract_params`` (``ShapeDtypeStruct``s with shardings).

  A partial restore: orbax reads each parameter's shards straight onto the
  devices that hold them (every process its own), and the optimizer state
  (twice the parameters again with Adam) is never read. A checkpoint whose
  files fail their manifest, or whose parameters hold NaN or inf, is refused
  (``SetupError`` naming the other complete steps).
  """
  mgr = ocp.CheckpointManager(ck_dir, options=ocp.CheckpointManagerOptions(create=False))
  try:
    step = mgr.latest_step() if step is None else step
    if step is None:
      raise SetupError(f"no complete checkpoint under {ck_dir}")
    others = [s for s in sorted(mgr.all_steps()) if s != step]
    choose = (f"; choose another with --step (complete: {', '.join(map(str, others))})" if others
              else "")
    if step not in mgr.all_steps():
      raise SetupError(f"no complete checkpoint {step} under {ck_dir}{choose}")
    why = check_manifest(os.path.join(ck_dir, str(step)))
    if why is not None:
      raise SetupError(f"checkpoint {step} in {ck_dir} is damaged: {why}{choose}")
    target = {"params": abstract_params}
    try:
      out = mgr.restore(step, args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(
              item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
              partial_restore=True),
          host=ocp.args.JsonRestore()))
    except Exception as e:  # noqa: BLE001 - orbax raises many kinds for a damaged checkpoint
      first = (str(e).strip().splitlines() or [""])[0]
      raise SetupError(f"cannot restore checkpoint {step} in {ck_dir}: {first}{choose}") from e
    bad = nonfinite_leaves(out["state"]["params"])
    if bad:
      raise SetupError(f"checkpoint {step} in {ck_dir} has NaN or inf in {bad} parameter "
                       f"array(s); refusing to use it{choose}")
  finally:
    mgr.close()
  return out["state"]["params"], step


def load_run(run_dir: str, step: int | None = None, *, mesh: Mesh | None = None):
  """(config, model with the checkpoint's params, tokenizer, step) of a run directory.

  With ``mesh``, every parameter is restored straight into its layout on
  ``mesh`` (``models.param_shardings``: the trainer's and sampler's), each
  process reading only its devices' shards; without it, onto this process's
  first device. Only the params are read (not the optimizer state), and
  ``model.path`` is not read at all: the checkpoint holds the weights.
  """
  cfg = _read_run_config(run_dir)
  # Shapes only: the checkpoint supplies the weights (reading model.path too
  # would put a whole second copy of the model on the devices).
  model, tok = load_policy(cfg, weights=False)
  ck_dir = os.path.join(run_dir, "checkpoints")
  if not os.path.isdir(ck_dir):
    raise SetupError(f"{run_dir} has no checkpoints/ directory")
  if mesh is not None:
    shardings = models.param_shardings(model.config, mesh)
  else:
    one = SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree.map(lambda _: one, model.params)
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          model.params, shardings)
  params, step = _restore_params(ck_dir, step, abstract)
  return cfg, model.replace(params=params), tok, step


def load_model_or_run(path: str, dtype: str = "float32", *, mesh: Mesh | None = None):
  """A HF directory (config.json) or a jaxent run directory (config.yaml + checkpoints).

  With ``mesh`` the params are loaded straight into their layout on it (a HF
  directory through ``models.from_pretrained(path, mesh=)``, a run through
  ``load_run(path, mesh=)``); ``evaluate_benchmark`` then generates on that
  mesh. ``eval_mesh`` chooses one as ``jaxent eval`` does.
  """
  if os.path.isfile(os.path.join(path, "config.yaml")):
    cfg, model, tok, _ = load_run(path, mesh=mesh)
    return model, tok, cfg
  if os.path.isfile(os.path.join(path, "config.json")):
    try:
      return (models.from_pretrained(path, dtype=dtype, mesh=mesh), models.load_tokenizer(path),
              None)
    except (FileNotFoundError, ValueError, OSError) as e:
      raise SetupError(f"cannot load {path}: {e}") from e
  raise SetupError(f"{path} is neither a Hugging Face directory (config.json) nor a jaxent run "
                   f"directory (config.yaml)")
