"""Declarative pipelines (``pipelines/*.yaml``): steps recorded by manifests, skipped when complete.

See :mod:`xscale.pipelines.runner` for the file format; run one with
``python -m xscale.pipelines pipelines/evaluate.yaml --out DIR``.
"""
from __future__ import annotations

from xscale.pipelines.evaluate import evaluate_adata
from xscale.pipelines.runner import (
    STEPS,
    StepContext,
    check_step,
    is_complete,
    load_experiment,
    load_pipeline,
    manifest_path,
    register_step,
    run_pipeline,
)

__all__ = [
    "STEPS", "StepContext", "check_step", "evaluate_adata", "is_complete", "load_experiment", "load_pipeline",
    "manifest_path", "register_step", "run_pipeline",
]
