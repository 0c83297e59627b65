"""Layer 7: the programs behind the CLI, over the library's public names.

``run_demo`` (``jaxent demo``), ``run_study`` (``jaxent study``), ``dry_run`` (``jaxent train --dry-run``),
``initialize_distributed`` (joining the hosts of a multi-process job) and
``fit_law`` (``jaxent fit-law``: the law fitted to a run, law.json and law.png).
Imports are light: jax, matplotlib and the trainer load when a program runs.
"""
from jaxent.apps._distributed import DistributedInfo, detect_cluster, initialize_distributed


def run_demo(out_dir: str, *, quick: bool = False, **kw):
  """``jaxent demo``: see ``jaxent.apps._demo.run_demo``."""
  from jaxent.apps._demo import run_demo as run  # jax and the trainer load here
  return run(out_dir, quick=quick, **kw)


def run_study(out_dir: str, **kw):
  """``jaxent study``: see ``jaxent.apps._study.run_study``."""
  from jaxent.apps._study import run_study as run  # jax and the trainer load here
  return run(out_dir, **kw)


def dry_run(cfg, **kw):
  """``jaxent train --dry-run``: see ``jaxent.apps._dryrun.dry_run``."""
  from jaxent.apps._dryrun import dry_run as run
  return run(cfg, **kw)


def fit_law(run_dir: str, **kw) -> str:
  """``jaxent fit-law``: see ``jaxent.apps._law_report.fit_law``."""
  from jaxent.apps._law_report import fit_law as run  # matplotlib loads here
  return run(run_dir, **kw)


__all__ = ["DistributedInfo", "detect_cluster", "dry_run", "fit_law",
           "initialize_distributed", "run_demo", "run_study"]
