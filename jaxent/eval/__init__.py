"""Layer 5 (above rollout): evaluation with the paper's decoding presets.

Settings and presets (``EvalSettings``, ``PRESETS``), benchmark files
(``resolve_benchmark``, ``resolve_fields``), metrics (``pass_at_k``,
``mean_at_k``, ``accuracy``: one correctness rule, ``rewards.is_correct``),
and one evaluator (``sample_and_grade``) behind both the training loop's
held-out evaluation (``heldout_metrics``) and ``jaxent eval``
(``evaluate_benchmark``). See docs/EVAL.md.
"""
from jaxent.eval._benchmarks import Benchmark, resolve_benchmark, resolve_fields, split_spec
from jaxent.eval._evaluator import (DEFAULT_ROWS_PER_SHARD, Samples, eos_ids, evaluate_benchmark,
                                    heldout_metrics, sample_and_grade, samples_per_call)
from jaxent.eval._metrics import accuracy, mean_at_k, pass_at_k
from jaxent.eval._report import format_presets, format_table
from jaxent.eval._settings import (DECODING_FIELDS, PRESETS, EvalPreset, EvalSettings,
                                   preset_for_file, preset_for_name)

__all__ = [
    "Benchmark", "DECODING_FIELDS", "DEFAULT_ROWS_PER_SHARD", "EvalPreset", "EvalSettings",
    "PRESETS", "Samples", "accuracy", "eos_ids", "evaluate_benchmark", "format_presets",
    "format_table", "heldout_metrics", "mean_at_k", "pass_at_k", "preset_for_file",
    "preset_for_name", "resolve_benchmark", "resolve_fields", "sample_and_grade",
    "samples_per_call", "split_spec",
]
