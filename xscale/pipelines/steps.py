"""Step kinds of declarative pipelines: thin, typed wrappers over the library.

Each ``fn(ctx, *, param=..., ...)`` writes under ``ctx.workdir`` and returns
``{"outputs": {key: path}, "results": {...}}`` (see :mod:`xscale.pipelines.runner`).
"""
from __future__ import annotations

from typing import Any, Literal

from xscale.pipelines.evaluate import dataset_keys as _dataset_keys
from xscale.pipelines.evaluate import evaluate_adata
from xscale.pipelines.runner import StepContext, register_step
from xscale.pipelines.runner import write_json as _write_json

Preset = Literal["tiny", "small", "base"]  # model sizes (GeneToCellConfig / CellToTissueConfig presets)


def _read_data(data: str, *, exclude_holdout: bool = False, counts_layer: str | None = None,
               gene_symbols: str | None = None):
    """A bundled dataset name (optionally without its held-out slide) or a path read by the data layer
    (``counts_layer``: the layer of raw counts when its X is normalised; ``gene_symbols``: the var column of
    gene symbols when var_names hold IDs, see :func:`xscale.data.validate.use_gene_symbols`)."""
    from xscale.data.io import read_source

    return read_source(data, exclude_holdout=exclude_holdout, gene_symbols=gene_symbols, spatial_key=None,
                       counts_layer=counts_layer)


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
def _step_pca_embed(ctx: StepContext, *, data: str, n_components: int = 30,
                    gene_symbols: str | None = None) -> dict[str, Any]:
    """Baseline store: ``obsm["X_pca"]`` of log-normalised expression (fitted on all cells)."""
    from xscale.data.writeback import write_anndata_zarr
    from xscale.eval import metrics as M

    adata = _read_data(data, gene_symbols=gene_symbols)
    adata.obsm["X_pca"] = M.pca(M.log_normalized(adata.X), n_components=n_components)[0]
    return {"outputs": {"store": write_anndata_zarr(adata, ctx.workdir / "cells.zarr")}}


@register_step("fit_level1")
def _step_fit_level1(
    ctx: StepContext, *, datasets: list[str], preset: Preset = "small", exclude_holdout: bool = True,
    max_epochs: int | None = None, max_steps: int = -1, batch_size: int = 128, lr: float = 2e-3, seed: int = 0,
    gene_symbols: str | list[str | None] | None = None,
) -> dict[str, Any]:
    """Pretrain level 1 on several datasets at once (held-out slides of bundled sets left out).
    ``gene_symbols``: one var column for all datasets or one entry per dataset (null where var_names are
    symbols already), see :func:`xscale.data.io.read_sources`."""
    from xscale.data.io import read_sources
    from xscale.train.level1 import fit_level1

    adatas = read_sources(datasets, gene_symbols=gene_symbols, exclude_holdout=exclude_holdout, spatial_key=None)
    fit_level1(adatas, preset, out_dir=ctx.workdir, max_epochs=max_epochs, max_steps=max_steps,
               batch_size=batch_size, lr=lr, seed=seed, accelerator="cpu")
    return {"outputs": {"checkpoint": ctx.workdir / "model"}}


@register_step("embed_cells")
def _step_embed_cells(ctx: StepContext, *, checkpoint: str, data: str,
                      counts_layer: str | None = None, gene_symbols: str | None = None) -> dict[str, Any]:
    """Embed every cell of ``data`` with a level-1 model: ``cells.zarr`` with ``obsm["X_xscale_cell"]``."""
    import xscale.tl
    from xscale.data.writeback import write_anndata_zarr
    from xscale.models.io import load_model

    adata = _read_data(data, counts_layer=counts_layer, gene_symbols=gene_symbols)
    xscale.tl.embed_cells(adata, load_model(checkpoint))
    return {"outputs": {"store": write_anndata_zarr(adata, ctx.workdir / "cells.zarr")}}


@register_step("fit_level2")
def _step_fit_level2(
    ctx: StepContext, *, store: str, dataset: str | None = None, slide_key: str | None = None,
    holdout: str | None = None, preset: Preset = "small", max_epochs: int = 20, max_steps: int = -1,
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
    from xscale.data.writeback import write_anndata_zarr
    from xscale.models.io import load_model

    adata = ad.read_zarr(store)
    slide_key = slide_key or _dataset_keys(dataset)["slide_key"]
    xscale.tl.embed_niches(adata, load_model(checkpoint), slide_key=slide_key)
    if n_domains:
        xscale.tl.domains(adata, n_domains, slide_key=slide_key)
    return {"outputs": {"store": write_anndata_zarr(adata, ctx.workdir / "cells.zarr")}}


@register_step("staged")
def _step_staged(
    ctx: StepContext, *, data: str, level1_preset: Preset = "small", level2_preset: Preset = "small",
    exclude_holdout: bool = True, slide_key: str | None = None, n_domains: int | None = None,
    level1_epochs: int = 20, level2_epochs: int = 30, level1_max_steps: int = -1, level2_max_steps: int = -1,
    batch_size: int = 128, seed: int = 0, evaluate: bool = True, gene_symbols: str | None = None,
) -> dict[str, Any]:
    """Staged training of both levels (:func:`xscale.train.staged.run_staged`), then evaluation."""
    from xscale.train.staged import run_staged

    adata = _read_data(data, gene_symbols=gene_symbols)
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
    batch_size: int = 64, lr: float = 1e-3, seed: int = 0, layer_mix: bool = False, ema_decay: float | None = None,
    thinning: float | None = None, correction: str = "mmd", correction_weight: float = 1.0,
    structure_weight: float | None = None, reconstruction_weight: float | None = None,
    counts_layer: str | None = None, gene_symbols: str | None = None,
) -> dict[str, Any]:
    """Parameter-efficient fine-tuning of a level-1 model (:func:`xscale.train.finetune.finetune`)."""
    from xscale.train.finetune import finetune

    adata = _read_data(data, counts_layer=counts_layer, gene_symbols=gene_symbols)
    result = finetune(model, adata, task=task, label_key=label_key, slide_key=slide_key,
                      trainable=trainable, max_epochs=max_epochs, max_steps=max_steps, batch_size=batch_size,
                      lr=lr, seed=seed, layer_mix=layer_mix, ema_decay=ema_decay, thinning=thinning,
                      correction=correction, correction_weight=correction_weight, structure_weight=structure_weight,
                      reconstruction_weight=reconstruction_weight, output_dir=ctx.workdir / "finetuned",
                      accelerator="cpu")
    return {"outputs": {"checkpoint": ctx.workdir / "finetuned" / "model", "run": ctx.workdir / "finetuned"},
            "results": {"metrics": result.metrics}}
