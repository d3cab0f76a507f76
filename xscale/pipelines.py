"""Declarative pipelines: a YAML list of steps, each recorded by a manifest and skipped when done.

A pipeline file (see ``pipelines/*.yaml``)::

    name: pretrain-multiscale
    steps:
      - name: level1                  # unique; names the manifest and the step's folder
        uses: fit_level1              # a registered step kind (see STEPS)
        with: {datasets: [starmap_mpfc, seqfish_embryo_wsir], preset: tiny, max_epochs: 1}
      - name: embed_starmap
        uses: embed_cells
        with: {checkpoint: ${level1.checkpoint}, data: starmap_mpfc}

``${out}`` is the pipeline's output directory, ``${STEP.KEY}`` an output of an earlier
step and ``${vars.NAME}`` a value from the file's ``vars:`` mapping (override with
``--var NAME=VALUE``); a value that is exactly one ``${vars.NAME}`` keeps its YAML type. Each step writes into ``OUT/STEP/`` and, when it finishes, ``OUT/manifests/STEP.json``:
its kind, parameters (and their hash), the outputs it produced (paths and sizes), results
(e.g. metrics) and timing. A re-run skips a step whose manifest matches its parameters and
whose outputs are all still there with the recorded sizes; ``force=True`` re-runs everything.

Run one with ``python -m xscale.pipelines pipelines/evaluate.yaml --out DIR``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xscale.errors import XscaleInputError

log = logging.getLogger(__name__)

MANIFESTS = "manifests"
_REF = re.compile(r"\$\{([A-Za-z0-9_]+)(?:\.([A-Za-z0-9_]+))?\}")


@dataclass
class StepSpec:
    name: str
    uses: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class StepContext:
    """What a step function receives: its own folder and the pipeline's output folder."""

    name: str
    workdir: Path  # OUT/STEP, created before the call
    out: Path


StepFn = Callable[..., dict[str, Any]]  # fn(ctx, **params) -> {"outputs": {...}, "results": {...}}
STEPS: dict[str, StepFn] = {}


def register_step(kind: str) -> Callable[[StepFn], StepFn]:
    """Register a step kind ``fn(ctx, *, param=..., ...)`` (keyword-only, typed parameters).

    It returns ``{"outputs": {key: path}, "results": {...}}``.
    """

    def wrap(fn: StepFn) -> StepFn:
        STEPS[kind] = fn
        return fn

    return wrap


# ------------------------------------------------------------------------ spec
def load_pipeline(path: str | Path) -> tuple[str, list[StepSpec], dict[str, Any]]:
    """Read and check a pipeline YAML; returns (name, steps, vars)."""
    import yaml

    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise XscaleInputError(f"Could not read pipeline {str(path)!r}: {err}") from err
    if not isinstance(doc, dict) or not isinstance(doc.get("steps"), list) or not doc["steps"]:
        raise XscaleInputError(f"Pipeline {str(path)!r} needs a non-empty 'steps:' list; found {type(doc).__name__}.")
    unknown = sorted(set(doc) - {"name", "description", "vars", "steps"})
    if unknown:
        raise XscaleInputError(
            f"Pipeline {str(path)!r}: unknown top-level keys {unknown}; expected name, description, vars, steps."
        )
    steps: list[StepSpec] = []
    for i, s in enumerate(doc["steps"]):
        if not isinstance(s, dict) or set(s) - {"name", "uses", "with", "config"} or "name" not in s:
            raise XscaleInputError(
                f"Pipeline step {i} must be a mapping with name, uses (or config: an experiment YAML) and "
                f"optional with; found {s!r}."
            )
        uses, params = s.get("uses"), dict(s.get("with") or {})
        if "config" in s:  # an experiment config (configs/experiment/*.yaml); `with` overrides its values
            uses, base = load_experiment(_relative(path, s["config"]))
            params = {**base, **params}
        if uses not in STEPS:
            raise XscaleInputError(f"Pipeline step {s['name']!r} uses unknown kind {uses!r}. Known: {sorted(STEPS)}.")
        if any(t.name == s["name"] for t in steps):
            raise XscaleInputError(f"Pipeline step name {s['name']!r} appears twice; names must be unique.")
        steps.append(StepSpec(str(s["name"]), str(uses), params))
    return str(doc.get("name", path.stem)), steps, dict(doc.get("vars") or {})


def _relative(pipeline: Path, ref: str) -> Path:
    """A config path as given if it exists (relative to the working directory), else relative to the repo."""
    p = Path(ref)
    if p.exists() or p.is_absolute():
        return p
    for base in (pipeline.resolve().parent, pipeline.resolve().parent.parent):
        if (base / ref).exists():
            return base / ref
    return p


def load_experiment(path: str | Path) -> tuple[str, dict[str, Any]]:
    """Read an experiment config (``uses: KIND`` + ``with: {...}``) and check its parameters."""
    import yaml

    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise XscaleInputError(f"Could not read experiment config {str(path)!r}: {err}") from err
    if not isinstance(doc, dict) or "uses" not in doc or set(doc) - {"uses", "with", "description"}:
        raise XscaleInputError(f"Experiment config {str(path)!r} needs 'uses:' and 'with:' keys; found {doc!r:.200}.")
    params = dict(doc.get("with") or {})
    check_step(doc["uses"], params, str(path))
    return doc["uses"], params


def check_step(kind: str, params: dict[str, Any], where: str) -> None:
    """Fail early (before running anything) when ``params`` do not fit step ``kind``'s signature."""
    import inspect

    if kind not in STEPS:
        raise XscaleInputError(f"{where}: unknown step kind {kind!r}. Known: {sorted(STEPS)}.")
    sig = inspect.signature(STEPS[kind])
    try:
        sig.bind(None, **params)
    except TypeError as err:
        names = [n for n in sig.parameters if n != "ctx"]
        raise XscaleInputError(f"{where}: step {kind!r} parameters do not fit: {err}. Parameters: {names}.") from None


def _resolve(value: Any, out: Path, done: dict[str, dict[str, Any]], step: str, variables: dict[str, Any]) -> Any:
    if isinstance(value, dict):
        return {k: _resolve(v, out, done, step, variables) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, out, done, step, variables) for v in value]
    if not isinstance(value, str):
        return value
    whole = _REF.fullmatch(value)
    if whole and whole.group(1) == "vars" and whole.group(2) in variables:
        return variables[whole.group(2)]

    def sub(m: re.Match) -> str:
        ref, key = m.group(1), m.group(2)
        if ref == "out" and key is None:
            return str(out)
        if ref == "vars":
            if key not in variables:
                raise XscaleInputError(f"Step {step!r} refers to {m.group(0)}; vars defines {sorted(variables)}.")
            return str(variables[key])
        if ref not in done:
            raise XscaleInputError(f"Step {step!r} refers to ${{{m.group(0)[2:-1]}}}, but no earlier step is named {ref!r}.")
        produced = {**done[ref].get("outputs", {}), **done[ref].get("results", {})}
        if key not in produced:
            raise XscaleInputError(f"Step {step!r} refers to {m.group(0)}; step {ref!r} produced {sorted(produced)}.")
        return str(produced[key]["path"] if isinstance(produced[key], dict) and "path" in produced[key] else produced[key])

    return _REF.sub(sub, value)


# -------------------------------------------------------------------- manifests
def _hash(kind: str, params: dict[str, Any]) -> str:
    text = json.dumps({"uses": kind, "with": params}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def manifest_path(out: Path, step: str) -> Path:
    return Path(out) / MANIFESTS / f"{step}.json"


def is_complete(out: Path, spec: StepSpec, params: dict[str, Any]) -> dict[str, Any] | None:
    """The step's manifest if it matches ``params`` and every output is there, intact; else None."""
    mp = manifest_path(out, spec.name)
    if not mp.exists():
        return None
    try:
        man = json.loads(mp.read_text())
    except json.JSONDecodeError:
        return None
    if man.get("params_hash") != _hash(spec.uses, params):
        log.info("step %s: parameters changed since the last run; re-running", spec.name)
        return None
    for key, rec in man.get("outputs", {}).items():
        p = Path(rec["path"])
        if not p.exists() or _size(p) != rec["bytes"]:
            log.info("step %s: output %s (%s) missing or changed; re-running", spec.name, key, p)
            return None
    return man


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str))
    tmp.replace(path)


# ------------------------------------------------------------------------- run
def run_pipeline(
    pipeline: str | Path, out: str | Path, *, force: bool = False, only: list[str] | None = None,
    variables: dict[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """Run a pipeline's steps in order; returns each step's manifest (with ``skipped`` set).

    Parameters
    ----------
    pipeline
        Path of the YAML file.
    out
        Output directory (steps write under ``out/STEP``; manifests under ``out/manifests``).
    force
        Re-run steps even when complete.
    only
        Run only these step names (their inputs must come from earlier complete manifests).
    variables
        Values overriding the file's ``vars:`` (unknown names are an error).
    """
    name, steps, file_vars = load_pipeline(pipeline)
    extra = sorted(set(variables or {}) - set(file_vars))
    if extra:
        raise XscaleInputError(f"Unknown pipeline vars {extra}; {pipeline} defines {sorted(file_vars)}.")
    file_vars.update(variables or {})
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    done: dict[str, dict[str, Any]] = {}
    for spec in steps:
        params = _resolve(spec.params, out, done, spec.name, file_vars)
        man = None if force else is_complete(out, spec, params)
        if only is not None and spec.name not in only:
            if man is None:
                man = is_complete(out, spec, params)
            if man is None:
                raise XscaleInputError(f"Step {spec.name!r} is needed by later steps but has not completed; run it first.")
        if man is not None:
            log.info("[%s] step %s (%s): complete, skipped", name, spec.name, spec.uses)
            done[spec.name] = {**man, "skipped": True}
            continue
        check_step(spec.uses, params, f"step {spec.name!r}")
        log.info("[%s] step %s (%s) ...", name, spec.name, spec.uses)
        workdir = out / spec.name
        workdir.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        produced = STEPS[spec.uses](StepContext(spec.name, workdir, out), **params)
        outputs = {}
        for key, p in produced.get("outputs", {}).items():
            p = Path(p)
            if not p.exists():
                raise RuntimeError(f"step {spec.name} reported output {key}={p} but it does not exist")
            outputs[key] = {"path": str(p), "bytes": _size(p)}
        man = {
            "pipeline": name, "step": spec.name, "uses": spec.uses, "params": params,
            "params_hash": _hash(spec.uses, params), "outputs": outputs,
            "results": produced.get("results", {}), "seconds": round(time.time() - t0, 2),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        _write_json(manifest_path(out, spec.name), man)
        done[spec.name] = {**man, "skipped": False}
    return done


# ------------------------------------------------------------------- evaluation
def evaluate_adata(
    adata, *, label_key: str | None, slide_key: str | None = None, holdout: str | None = None,
    domain_key: str | None = None, drop_labels: tuple[str, ...] = (), seed: int = 0,
) -> dict[str, Any]:
    """Score xscale latents against baselines, on held-out cells only.

    Cell level (``label_key``): logistic-regression probe fitted on the training slides and
    scored on slide ``holdout`` (a stratified 80/20 split when there is none), for
    ``obsm["X_xscale_cell"]`` and PCA of log-normalised expression (fitted on training cells).
    Tissue level (``domain_key``, on the held-out slide): k-means ARI/NMI with k = number of
    annotated domains, for ``obsm["X_xscale_niche"]``, ``obs["xscale_domain"]`` as clustered,
    PCA, and the mean of PCA over each cell and its 10 nearest spatial neighbours.
    Cells with a missing label are left out. Returns a JSON-ready dict.
    """
    import numpy as np
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    from xscale.eval import metrics as M

    out: dict[str, Any] = {"n_cells": int(adata.n_obs), "holdout": holdout}
    slides = adata.obs[slide_key].astype(str).to_numpy() if slide_key else None
    if holdout is not None and slides is not None and (slides == holdout).any():
        test = slides == holdout
    else:
        test = np.random.default_rng(seed).random(adata.n_obs) < 0.2
        out["holdout"] = "random 20%"
    logn = M.log_normalized(adata.X)
    pcs_train, pcs_all = M.pca(logn[~test], [logn], n_components=30, seed=seed)
    del pcs_train
    if label_key and label_key in adata.obs:
        y = adata.obs[label_key].astype(object).to_numpy()
        keep = adata.obs[label_key].notna().to_numpy() & ~np.isin(y, list(drop_labels))
        tr, te = keep & ~test, keep & test
        reps = {"pca": pcs_all}
        if "X_xscale_cell" in adata.obsm:
            reps = {"xscale_cell": np.asarray(adata.obsm["X_xscale_cell"]).reshape(adata.n_obs, -1), **reps}
        out["cell_type"] = {
            name: M.probe_scores(X[tr], y[tr].astype(str), X[te], y[te].astype(str), seed=seed) for name, X in reps.items()
        }
    if domain_key and domain_key in adata.obs and "spatial" in adata.obsm:
        m = test & adata.obs[domain_key].notna().to_numpy()
        lab = adata.obs[domain_key].astype(str).to_numpy()[m]
        k = len(set(lab))
        xy = np.asarray(adata.obsm["spatial"])[m]
        reps = {"pca": pcs_all[m], "pca_spatial_mean": M.spatial_mean(pcs_all[m], xy, k=10)}
        if "X_xscale_cell" in adata.obsm:
            cell = np.asarray(adata.obsm["X_xscale_cell"]).reshape(adata.n_obs, -1)[m]
            reps["xscale_cell_spatial_mean"] = M.spatial_mean(cell, xy, k=10)
        if "X_xscale_niche" in adata.obsm:
            reps = {"xscale_niche": np.asarray(adata.obsm["X_xscale_niche"]).reshape(adata.n_obs, -1)[m], **reps}
        dom = {name: M.cluster_scores(X, lab, k) for name, X in reps.items()}
        if "xscale_domain" in adata.obs:
            pred = adata.obs["xscale_domain"].astype(str).to_numpy()[m]
            dom["xscale_domain"] = {"ari": float(adjusted_rand_score(lab, pred)),
                                    "nmi": float(normalized_mutual_info_score(lab, pred))}
        out["domains"] = {"n_domains": k, "n_cells": int(m.sum()), **dom}
    return out


def _dataset_keys(dataset: str | None) -> dict[str, Any]:
    """Label/slide/holdout/domain keys of a bundled dataset (all None for None)."""
    keys: dict[str, Any] = {"label_key": None, "slide_key": None, "holdout": None, "domain_key": None, "drop_labels": ()}
    if dataset is not None:
        import xscale.datasets as ds

        info = ds.info(dataset)
        keys.update(label_key=info.label_key, slide_key=info.slide_key, holdout=info.holdout,
                    domain_key=info.domain_key, drop_labels=tuple(info.drop_labels))
    return keys


def _read_data(data: str, *, exclude_holdout: bool = False):
    """A bundled dataset name (optionally without its held-out slide) or a path read by the data layer."""
    import xscale.datasets as ds

    if data in ds.available():
        adata, info = ds.load(data), ds.info(data)
        if exclude_holdout and info.holdout is not None:
            adata = adata[adata.obs[info.slide_key].astype(str) != info.holdout].copy()
        return adata
    from xscale.data.io import read_dataset

    return read_dataset(data, spatial_key=None)


def _write_zarr(adata, path: Path) -> Path:
    import shutil

    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    adata.write_zarr(tmp)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path


@register_step("evaluate")
def _step_evaluate(
    ctx: StepContext, *, store: str, dataset: str | None = None, label_key: str | None = None,
    slide_key: str | None = None, holdout: str | None = None, domain_key: str | None = None,
) -> dict[str, Any]:
    """Score a store's latents against baselines (see :func:`evaluate_adata`); keys default from ``dataset``."""
    import anndata as ad

    keys = _dataset_keys(dataset)
    given = dict(label_key=label_key, slide_key=slide_key, holdout=holdout, domain_key=domain_key)
    keys.update({k: v for k, v in given.items() if v is not None})
    metrics = evaluate_adata(ad.read_zarr(store), **keys)
    path = ctx.workdir / "metrics.json"
    _write_json(path, metrics)
    return {"outputs": {"metrics": path}, "results": {"metrics": metrics}}


@register_step("pca_embed")
def _step_pca_embed(ctx: StepContext, *, data: str, n_components: int = 30) -> dict[str, Any]:
    """Baseline store: ``obsm["X_pca"]`` of log-normalised expression (fitted on all cells)."""
    from xscale.eval import metrics as M

    adata = _read_data(data)
    adata.obsm["X_pca"] = M.pca(M.log_normalized(adata.X), n_components=n_components)[0]
    return {"outputs": {"store": _write_zarr(adata, ctx.workdir / "cells.zarr")}}


@register_step("fit_level1")
def _step_fit_level1(
    ctx: StepContext, *, datasets: list[str], preset: str = "small", exclude_holdout: bool = True,
    max_epochs: int | None = None, max_steps: int = -1, batch_size: int = 128, lr: float = 2e-3, seed: int = 0,
) -> dict[str, Any]:
    """Pretrain level 1 on several datasets at once (held-out slides of bundled sets left out)."""
    from xscale.train.level1 import fit_level1

    adatas = [_read_data(d, exclude_holdout=exclude_holdout) for d in datasets]
    fit_level1(adatas, preset, out_dir=ctx.workdir, max_epochs=max_epochs, max_steps=max_steps,
               batch_size=batch_size, lr=lr, seed=seed, accelerator="cpu")
    return {"outputs": {"checkpoint": ctx.workdir / "model"}}


@register_step("embed_cells")
def _step_embed_cells(ctx: StepContext, *, checkpoint: str, data: str) -> dict[str, Any]:
    """Embed every cell of ``data`` with a level-1 model: ``cells.zarr`` with ``obsm["X_xscale_cell"]``."""
    import xscale.tl
    from xscale.models.io import load_model

    adata = _read_data(data)
    xscale.tl.embed_cells(adata, load_model(checkpoint))
    return {"outputs": {"store": _write_zarr(adata, ctx.workdir / "cells.zarr")}}


@register_step("fit_level2")
def _step_fit_level2(
    ctx: StepContext, *, store: str, dataset: str | None = None, slide_key: str | None = None,
    holdout: str | None = None, preset: str = "small", max_epochs: int = 20, max_steps: int = -1,
    batch_size: int = 64, seed: int = 0,
) -> dict[str, Any]:
    """Fit level 2 on a store's cell latents (niches centred outside the held-out slide)."""
    import anndata as ad
    import numpy as np

    from xscale.models.io import save_model
    from xscale.train.level2 import fit_level2

    adata = ad.read_zarr(store)
    keys = _dataset_keys(dataset)
    slide_key, holdout = slide_key or keys["slide_key"], holdout or keys["holdout"]
    slides = adata.obs[slide_key].astype(str).to_numpy() if slide_key else None
    train = np.flatnonzero(slides != holdout) if slides is not None and holdout else None
    latents = np.asarray(adata.obsm["X_xscale_cell"]).reshape(adata.n_obs, -1)
    model = fit_level2(latents, np.asarray(adata.obsm["spatial"]), preset=preset, train_cells=train, slides=slides,
                       max_epochs=max_epochs, max_steps=max_steps, batch_size=batch_size, seed=seed,
                       ckpt_dir=ctx.workdir / "checkpoints", progress=True)
    save_model(model, ctx.workdir / "model")
    return {"outputs": {"checkpoint": ctx.workdir / "model"}}


@register_step("embed_niches")
def _step_embed_niches(
    ctx: StepContext, *, store: str, checkpoint: str, n_domains: int | None = None, dataset: str | None = None,
    slide_key: str | None = None,
) -> dict[str, Any]:
    """Niche latents (``obsm["X_xscale_niche"]``) and, with ``n_domains``, ``obs["xscale_domain"]``."""
    import anndata as ad

    import xscale.tl
    from xscale.models.io import load_model

    adata = ad.read_zarr(store)
    xscale.tl.embed_niches(adata, load_model(checkpoint), slide_key=slide_key or _dataset_keys(dataset)["slide_key"])
    if n_domains:
        xscale.tl.domains(adata, n_domains)
    return {"outputs": {"store": _write_zarr(adata, ctx.workdir / "cells.zarr")}}


@register_step("staged")
def _step_staged(
    ctx: StepContext, *, data: str, level1_preset: str = "small", level2_preset: str = "small",
    exclude_holdout: bool = True, slide_key: str | None = None, n_domains: int | None = None,
    level1_epochs: int = 20, level2_epochs: int = 30, level1_max_steps: int = -1, level2_max_steps: int = -1,
    batch_size: int = 128, seed: int = 0, evaluate: bool = True,
) -> dict[str, Any]:
    """Staged training of both levels (:func:`xscale.train.staged.run_staged`), then evaluation."""
    from xscale.train.staged import run_staged

    adata = _read_data(data)
    keys = _dataset_keys(data if _is_bundled(data) else None)
    slide_key = slide_key or keys["slide_key"]
    train_slides = None
    if exclude_holdout and keys["holdout"]:
        train_slides = sorted(set(adata.obs[slide_key].astype(str)) - {keys["holdout"]})
    result = run_staged(adata, ctx.workdir, level1_preset=level1_preset, level2_preset=level2_preset,
                        train_slides=train_slides, slide_key=slide_key, n_domains=n_domains,
                        level1_epochs=level1_epochs, level2_epochs=level2_epochs, level1_max_steps=level1_max_steps,
                        level2_max_steps=level2_max_steps, batch_size=batch_size, seed=seed, accelerator="cpu")
    outputs: dict[str, Any] = {"store": result.store, "checkpoints": ctx.workdir / "checkpoints"}
    results: dict[str, Any] = {"seconds": result.seconds}
    if evaluate:
        results["metrics"] = evaluate_adata(result.adata, **keys)
        _write_json(ctx.workdir / "metrics.json", results["metrics"])
        outputs["metrics"] = ctx.workdir / "metrics.json"
    return {"outputs": outputs, "results": results}


def _is_bundled(name: str) -> bool:
    import xscale.datasets as ds

    return name in ds.available()


@register_step("finetune")
def _step_finetune(
    ctx: StepContext, *, model: str, data: str, task: str = "cell_type", label_key: str | None = None,
    slide_key: str | None = None, trainable: str = "xpressor", max_epochs: int = 10, max_steps: int = -1,
    batch_size: int = 64, lr: float = 1e-3, seed: int = 0,
) -> dict[str, Any]:
    """Parameter-efficient fine-tuning of a level-1 model (:func:`xscale.train.finetune.finetune`)."""
    from xscale.train.finetune import finetune

    result = finetune(model, _read_data(data), task=task, label_key=label_key, slide_key=slide_key,
                      trainable=trainable, max_epochs=max_epochs, max_steps=max_steps, batch_size=batch_size,
                      lr=lr, seed=seed, output_dir=ctx.workdir / "finetuned", accelerator="cpu")
    return {"outputs": {"checkpoint": ctx.workdir / "finetuned" / "model", "run": ctx.workdir / "finetuned"},
            "results": {"metrics": result.metrics}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xscale.pipelines", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pipeline", help="pipeline YAML (pipelines/*.yaml)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--force", action="store_true", help="re-run complete steps")
    parser.add_argument("--only", nargs="+", help="run only these steps")
    parser.add_argument("--var", action="append", default=[], metavar="NAME=VALUE", help="override a vars: entry")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        import yaml

        variables = {}
        for item in args.var:
            name, sep, value = item.partition("=")
            if not sep:
                raise XscaleInputError(f"--var {item!r} is not NAME=VALUE.")
            variables[name] = yaml.safe_load(value)
        done = run_pipeline(args.pipeline, args.out, force=args.force, only=args.only, variables=variables)
    except XscaleInputError as err:
        print(f"xscale pipeline: error: {err}")
        return 2
    for step, man in done.items():
        print(f"{step}: {'skipped (complete)' if man['skipped'] else 'ran in %.1fs' % man['seconds']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
