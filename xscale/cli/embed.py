"""``xscale embed``: embed a dataset's cells (and niches) with trained checkpoints."""
from __future__ import annotations

import argparse

from xscale.cli.options import add_gene_symbols, options_given, positive_int, refuse_gene_symbols_for_store

HELP = "embed cells (and niches) of a dataset with trained checkpoints into DIR/cells.zarr"
DESCRIPTION = """\
Write DIR/cells.zarr (AnnData zarr) with obsm["X_xscale_cell"] from a level-1 model and,
when a level-2 model is found, obsm["X_xscale_niche"] (and obs["xscale_domain"] with
--n-domains). The store is written under a temporary name and renamed when complete.

--checkpoint accepts:
  a model directory written by save_model (model.safetensors + config.json);
  a run's checkpoints directory holding level1/ (and level2/), as model directories or as
    level1/model, level2/model (the layout of `xscale demo` / `run`), e.g. xscale-demo/checkpoints;
  a Lightning .ckpt from `xscale fit`, read with torch.load(weights_only=True) (never unpickles code).
--data accepts a bundled dataset name (e.g. starmap_mpfc), an .h5ad, or an AnnData/SpatialData zarr.
  A store written by `xscale prepare` is embedded out of core, block by block, into the store
  itself (obsm/X_xscale_cell, obsm/X_xscale_niche; read with anndata.read_zarr): an
  interrupted run resumes where it stopped when re-run. --out is not used then.
--dask local|ADDRESS embeds level 1 of an .h5ad / AnnData zarr on a Dask cluster (chunks of
cells per worker): the validated input is held in memory and copied to a zarr the workers
read. A prepared store on a cluster: xscale.tl.dask_embed.embed_store_dask from Python.

example: xscale embed --checkpoint xscale-demo/checkpoints --data my.h5ad --out my-embedding --n-domains 6
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--checkpoint", required=True,
                   help="model directory, a run folder (RUN or RUN/checkpoints), or .ckpt")
    p.add_argument("--data", required=True, help="bundled dataset name, .h5ad, or AnnData/SpatialData zarr")
    p.add_argument("--out", help="output directory (DIR/cells.zarr is written); not used for a prepared store")
    p.add_argument("--level2", help="level-2 model directory (default: CHECKPOINT/level2 when present)")
    p.add_argument("--n-domains", type=int, help="also cluster niche latents into this many domains")
    p.add_argument("--no-slide-center", action="store_true",
                   help="with --n-domains: cluster the niche latents as they are; by default each slide's "
                   "(--slide-key) latents are centred first, as in xscale run")
    p.add_argument("--spatial-key", default="spatial",
                   help="obsm key of coordinates (default spatial); 'none' for no coordinates (level 1 only)")
    p.add_argument("--slide-key", help="obs column naming each cell's slide")
    p.add_argument("--counts-layer", help="layer holding raw counts when X is normalised")
    add_gene_symbols(p)
    p.add_argument("--table-key", help="SpatialData table to read")
    p.add_argument("--batch-size", type=positive_int, default=256, help="cells per forward pass (default 256)")
    p.add_argument("--dask", metavar="local|ADDRESS", help="embed level 1 on a Dask cluster")
    p.add_argument("--n-workers", type=positive_int, default=2, help="workers of --dask local (default 2)")
    p.add_argument("--overwrite", action="store_true", help="prepared store: replace latents already in it")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--write-back", action="store_true",
                   help="SpatialData --data, or a store prepared from one: also put the latents into its table "
                   "(obsm) and a niche table")


def check_write_back_source(data: str) -> str:
    """``--write-back`` needs ``--data`` to be a SpatialData zarr store, or a store prepared from one whose
    source is still there: that SpatialData path; XscaleInputError otherwise."""
    from pathlib import Path

    import xscale.datasets as ds
    from xscale.data.io import detect_format
    from xscale.data.store import CellStore, is_prepared_store
    from xscale.errors import XscaleInputError

    if is_prepared_store(data):
        store = CellStore(data)
        if store.source_format == "spatialdata-zarr" and Path(store.source).exists():
            return store.source
        if store.source_format == "spatialdata-zarr":
            made_from = f"{store.source}, which no longer exists"
        else:
            fmt = store.source_format or "its format not recorded (prepared by an earlier xscale)"
            made_from = f"{store.source or 'an in-memory AnnData'}, {fmt}"
        raise XscaleInputError(
            f"--write-back: expected --data to be a SpatialData zarr store or a store prepared from one, found a "
            f"prepared store made from {made_from}. Omit --write-back (the latents are in {data}/obsm), or call "
            "xscale.data.writeback.write_to_spatialdata(sdata_path, store) with the SpatialData store's path.")
    found = "a bundled dataset" if data in ds.available() else detect_format(data)
    if found != "spatialdata-zarr":
        raise XscaleInputError(
            f"--write-back: expected --data to be a SpatialData zarr store, found {found}. Omit --write-back "
            "(DIR/cells.zarr holds the results).")
    return data


def load_level_models(checkpoint: str, level2: str | None = None):
    """(level-1 model, its directory or None for a .ckpt, level-2 model or None) from --checkpoint."""
    from pathlib import Path

    import xscale.models.cell_to_tissue  # noqa: F401  (registers model classes)
    import xscale.models.gene_to_cell  # noqa: F401
    from xscale.errors import CheckpointError, XscaleInputError
    from xscale.models.io import CONFIG, load_model
    from xscale.models.levels import as_level_model, find_model_dir

    path = Path(checkpoint)
    if not path.exists():
        raise XscaleInputError(f"--checkpoint {checkpoint!r} does not exist; pass a model directory, "
                               "DIR/checkpoints or a .ckpt.")
    l1_dir = None
    if path.is_dir() and find_model_dir(path / "level1") is None and (path / "checkpoints").is_dir():
        path = path / "checkpoints"  # the run folder of xscale run / demo
    if path.is_file():
        l1 = _from_lightning_ckpt(path)
    elif find_model_dir(path) is not None:  # a model directory, or a folder holding one in model/ (finetune's OUT)
        l1_dir = find_model_dir(path)
    elif find_model_dir(path / "level1") is not None:
        l1_dir = find_model_dir(path / "level1")
        if level2 is None and find_model_dir(path / "level2") is not None:
            level2 = str(find_model_dir(path / "level2"))
    else:
        raise CheckpointError(
            f"{checkpoint}: expected a model directory ({CONFIG} + model.safetensors), a directory holding "
            f"level1/ (RUN/checkpoints), a run folder (RUN), or a Lightning .ckpt; found "
            f"{sorted(p.name for p in path.iterdir())[:10]}."
        )
    if l1_dir is not None:
        l1 = load_model(l1_dir)
    if not hasattr(l1, "decode") or not hasattr(l1, "encode"):
        raise CheckpointError(f"{checkpoint} holds a {type(l1).__name__}; "
                              "embedding needs the level-1 (GeneToCell) model.")
    l2 = None
    if level2:
        l2_dir = find_model_dir(Path(level2))
        if l2_dir is None:
            raise CheckpointError(f"--level2 {level2}: no saved model ({CONFIG}) there or in its model/ folder.")
        l2 = as_level_model(load_model(l2_dir), 2, f"--level2 {level2}").eval()
    return l1.eval(), l1_dir, l2


def _from_lightning_ckpt(path):
    """A GeneToCell from a Lightning checkpoint of level 1 (weights_only read; config from hyper-parameters)."""
    from xscale.errors import CheckpointError
    from xscale.models.gene_to_cell import GeneToCell, GeneToCellConfig
    from xscale.models.io import config_from_dict
    from xscale.train.checkpointing import load_lightning_checkpoint

    ckpt = load_lightning_checkpoint(path)
    cfg = (ckpt.get("hyper_parameters") or {}).get("model_config")
    if not isinstance(cfg, dict):
        raise CheckpointError(
            f"{path} has no level-1 model_config in its hyper-parameters; pass the model directory saved "
            "next to it (save_model) instead."
        )
    model = GeneToCell(config_from_dict(GeneToCellConfig, cfg))
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path} does not match its model config: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}.")
    return model


def _embed_dask(args: argparse.Namespace, adata, l1_dir, out):
    """Level-1 latents (n, K*D) computed on a Dask cluster from a zarr copy of the input."""
    import shutil

    import anndata as ad
    import numpy as np

    from xscale.data.zarr_settings import zarr_format_2
    from xscale.errors import XscaleInputError

    try:
        from xscale.tl.dask_embed import embed_store_dask
    except ImportError as err:
        raise XscaleInputError(f"--dask needs xscale.tl.dask_embed, which this install lacks ({err}).") from err
    if l1_dir is None:
        raise XscaleInputError("--dask needs a level-1 model directory (workers load it), not a .ckpt file.")
    src, dst = out / "input.tmp.zarr", out / "dask_cells.tmp.zarr"
    shutil.rmtree(src, ignore_errors=True)
    with zarr_format_2():
        adata.write_zarr(src)  # validated raw counts, chunked for the workers
    try:
        embed_store_dask(src, l1_dir, dst, client_or_address=args.dask, n_workers=args.n_workers,
                         batch_size=args.batch_size, overwrite=True)
        latents = np.asarray(ad.read_zarr(dst).obsm["X_xscale_cell"])
    finally:
        shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(dst, ignore_errors=True)
    return latents


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import numpy as np

    import xscale.datasets as ds
    import xscale.tl
    from xscale.data.store import is_prepared_store
    from xscale.data.writeback import write_anndata_zarr
    from xscale.errors import XscaleInputError
    from xscale.utils.atomic import check_replaceable, make_output_dir

    ds.check_source(args.data, option="--data")  # before loading any model
    if str(args.spatial_key).lower() == "none":
        args.spatial_key = None
    l1, l1_dir, l2 = load_level_models(args.checkpoint, args.level2)
    if l2 is not None and args.spatial_key is None:
        raise XscaleInputError(
            "--spatial-key none: niche embedding (the level-2 model found with --checkpoint) needs coordinates. "
            "Pass the obsm key of the coordinates, or embed level 1 only (--checkpoint RUN/checkpoints/level1/model).")
    target = check_write_back_source(args.data) if args.write_back else None  # before any work
    if is_prepared_store(args.data):
        refuse_gene_symbols_for_store(args)
        _refuse_input_options_for_store(args)
        return _embed_prepared_store(args, l1, l2, target)
    if args.out is None:
        raise XscaleInputError("--out: expected an output directory (DIR/cells.zarr is written), found none.")
    from xscale.data.io import read_source

    adata = read_source(args.data, table_key=args.table_key, spatial_key=args.spatial_key if l2 is not None else None,
                        counts_layer=args.counts_layer, slide_key=args.slide_key, gene_symbols=args.gene_symbols)
    bundled = args.data in ds.available()
    slide_key = args.slide_key or (ds.info(args.data).slide_key if bundled else None)
    if slide_key and slide_key not in adata.obs:  # before any embedding
        raise XscaleInputError(f"--slide-key {slide_key!r}: expected an obs column of {args.data}, found none by that "
                               f"name. Available: {list(adata.obs.columns)}. Omit --slide-key for a single slide.")
    if args.n_domains is not None and not 2 <= args.n_domains <= adata.n_obs:  # before embedding
        raise XscaleInputError(f"--n-domains: expected 2..{adata.n_obs} (the number of cells), found {args.n_domains}.")
    if args.n_domains and l2 is None:
        raise XscaleInputError("--n-domains clusters niche latents: expected a level-2 model (--checkpoint "
                               "RUN/checkpoints holding level2/, or --level2), found none.")
    check_replaceable(Path(args.out) / "cells.zarr")  # before embedding: never the user's own store
    out = make_output_dir(args.out)
    if args.dask:
        adata.obsm["X_xscale_cell"] = _embed_dask(args, adata, l1_dir, out)
    else:
        xscale.tl.embed_cells(adata, l1, batch_size=args.batch_size, progress=not args.no_progress)
    print(f"cell latents: obsm['X_xscale_cell'] {np.asarray(adata.obsm['X_xscale_cell']).shape}")
    if l2 is not None:
        if args.spatial_key not in adata.obsm:
            raise XscaleInputError(
                f"Niche embedding needs coordinates in obsm[{args.spatial_key!r}]; available: {sorted(adata.obsm)}. "
                "Pass --spatial-key, or embed level 1 only (a model directory without level2/)."
            )
        xscale.tl.embed_niches(adata, l2, slide_key=slide_key, spatial_key=args.spatial_key,
                               progress=not args.no_progress)
        print(f"niche latents: obsm['X_xscale_niche'] {np.asarray(adata.obsm['X_xscale_niche']).shape}")
        if args.n_domains:
            xscale.tl.domains(adata, args.n_domains, slide_key=None if args.no_slide_center else slide_key)
            print(f"domains: obs['xscale_domain'] ({args.n_domains})")
    if args.spatial_key not in (None, "spatial") and args.spatial_key in adata.obsm:
        adata.obsm["spatial"] = np.asarray(adata.obsm[args.spatial_key])  # where the query layer looks
    meta = {"slide_key": slide_key or "", "checkpoint": str(args.checkpoint)}
    if bundled:
        info = ds.info(args.data)
        meta.update(name=info.name, label_key=info.label_key, domain_key=info.domain_key or "",
                    holdout=info.holdout or "")
    adata.uns["xscale"] = meta
    write_anndata_zarr(adata, out / "cells.zarr")
    print(f"wrote {out / 'cells.zarr'}")
    if args.write_back:
        from xscale.data.writeback import write_adata_to_spatialdata

        niche_key = "X_xscale_niche" if "X_xscale_niche" in adata.obsm else None
        table = write_adata_to_spatialdata(args.data, adata, table_key=args.table_key, niche_key=niche_key,
                                           obs_keys=("xscale_domain",))
        print(f"wrote obsm['X_xscale_cell'] {table.obsm['X_xscale_cell'].shape} into the table of {args.data}"
              + (" and the niche latents into its niche table" if niche_key else ""))
    return 0


#: Options that say how to read an input; a prepared store was read by xscale prepare (their defaults here).
STORE_READ_OPTIONS = {"slide_key": None, "spatial_key": "spatial", "counts_layer": None}


def _refuse_input_options_for_store(args: argparse.Namespace) -> None:
    """A prepared store has its counts, slides and coordinates from xscale prepare: reading options given with it
    would be ignored, so they are refused (--table-key is for --write-back only)."""
    from xscale.errors import XscaleInputError

    given = options_given(args, STORE_READ_OPTIONS)
    if args.table_key is not None and not args.write_back:
        given.append("--table-key (without --write-back)")
    if given:
        raise XscaleInputError(
            f"--data {args.data} is a prepared store: expected none of {', '.join(given)}, found them. The store "
            "has its counts, slides and coordinates from xscale prepare, so these would be ignored: leave them out, "
            "or prepare again with them.")


def _embed_prepared_store(args: argparse.Namespace, l1, l2, target: str | None) -> int:
    """Out-of-core, resumable embedding of a prepared store into its own obsm; then, with ``target`` (the
    SpatialData store it was prepared from, --write-back), into that store's table."""
    from xscale.errors import XscaleInputError
    from xscale.tl.store_embed import embed_store_cells, embed_store_niches

    if args.dask:
        raise XscaleInputError(
            f"--data {args.data} is a prepared store, embedded out of core in this process: expected no --dask, "
            "found it. To embed a store on a Dask cluster, call xscale.tl.dask_embed.embed_store_dask(store, "
            "model_dir, out_path, client_or_address=...) from Python."
        )
    if args.n_domains:
        raise XscaleInputError(
            f"--data {args.data} is a prepared store (embedded out of core): expected no --n-domains, found it. "
            "Embed first, then cluster the niche latents (e.g. xscale domains on the store)."
        )
    from xscale.data.store import CellStore

    store = CellStore(args.data)  # opened once: its identity (partials' fingerprint) is computed once
    if l2 is not None and not store.spatial:  # before any work
        raise XscaleInputError(
            f"--data {args.data} was prepared without coordinates: niche embedding (the level-2 model found with "
            "--checkpoint) needs them. Embed level 1 only (--checkpoint RUN/checkpoints/level1/model), or prepare "
            "again with --spatial-key KEY.")
    if args.out:
        print(f"note: --data is a prepared store; results go into {args.data}/obsm, --out is not used")
    progress = not args.no_progress
    path = embed_store_cells(store, l1, batch_size=args.batch_size, overwrite=args.overwrite, progress=progress)
    print(f"cell latents: {path}")
    if l2 is None:
        from xscale.tl.store_embed import stale_niche_latents

        if stale_niche_latents(store):
            print(f"warning: {args.data}/obsm/X_xscale_niche was computed from the earlier cell latents: embed the "
                  "niches again (--checkpoint with the level-2 model, --overwrite) before using them; xscale domains "
                  "refuses them until then")
    if l2 is not None:
        path = embed_store_niches(store, l2, batch_size=args.batch_size, overwrite=args.overwrite,
                                  progress=progress)
        print(f"niche latents: {path}")
    if target is not None:
        from xscale.data.writeback import write_to_spatialdata

        niche_key = "X_xscale_niche" if l2 is not None else None
        table = write_to_spatialdata(target, store, table_key=args.table_key, niche_key=niche_key)
        print(f"wrote obsm['X_xscale_cell'] {table.obsm['X_xscale_cell'].shape} into the table of {target}"
              + (" and the niche latents into its niche table" if niche_key else ""))
    return 0
