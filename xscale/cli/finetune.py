"""``xscale finetune``: adapt a pretrained level-1 model by training only its Xpressor."""
from __future__ import annotations

import argparse

from xscale.cli.options import add_gene_symbols, positive_float, positive_int, seed_int

HELP = "fine-tune a pretrained model's Xpressor (cell-type head or slide correction)"
DESCRIPTION = """\
Load a pretrained level-1 model, freeze the encoders and train only the Xpressor blocks
(plus a small head): --task cell_type trains a classifier on the cell latents from
--label-key; --task batch_correction makes slides (--slide-key) indistinguishable in the
latents (an MMD between slides by default, or an adversarial slide classifier) while
keeping the reconstruction loss and, with --structure-weight (default 1), the inner
products between cells of the same slide, so cell types stay apart while the slides are
aligned. A correction that collapses the latents (every cell mapped to nearly the same
point), or that keeps less than half of each cell's nearest neighbours within its slide
(cell types may be mixed), is reported with a warning.
Writes OUT/model (the fine-tuned model, usable by `xscale embed`), OUT/head (cell_type)
and OUT/finetune.json (settings, trainable fraction, held-out metrics; for a slide
correction the latents' spread and slide mixing before and after, and the share of
within-slide neighbours kept; with --label-key, the cell types' kNN purity before and after, a
warning when it drops by 0.02 or more) and, for a slide correction, OUT/correction.png: up to 512
training cells before and after (UMAP of their latents), coloured by slide.

Examples:
  xscale finetune runs/pretrain/model data.h5ad --task cell_type --label-key cell_type \\
      --train-key split --train-values train --out runs/ft
  xscale finetune runs/pretrain/model starmap_mpfc --task batch_correction --slide-key slice \\
      --epochs 12 --out runs/bc     # MMD + structure weight 1 (the defaults)
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("model", help="a saved level-1 model: its directory (model.safetensors + config.json), "
                   "or the run folder of `xscale run` / `demo` (RUN or RUN/checkpoints)")
    p.add_argument("data", help="an .h5ad file, AnnData zarr or SpatialData zarr with raw counts (--table-key "
                   "to pick a table), or a bundled dataset name (e.g. starmap_mpfc)")
    p.add_argument("--out", required=True,
                   help="output directory: new, empty or an earlier finetune output (replaced whole, atomically); "
                        "a folder holding anything else (a run's output, your files) is refused")
    p.add_argument("--task", choices=("cell_type", "batch_correction"), default="cell_type")
    p.add_argument("--label-key", help="obs column with cell-type labels (task cell_type; with batch_correction, "
                   "optional and never trained on: their kNN purity is reported before and after)")
    p.add_argument("--slide-key", help="obs column with the slide / batch of each cell (task batch_correction; "
                   "default for a bundled dataset: its slide key)")
    p.add_argument("--train-key", help="obs column choosing training cells: booleans, or values given by "
                   "--train-values (default: all cells train)")
    p.add_argument("--train-values", nargs="+", help="values of --train-key that mark training cells")
    p.add_argument("--trainable", choices=("xpressor", "head", "all"), default="xpressor",
                   help="what trains besides the head (default: xpressor)")
    p.add_argument("--layer-mix", action="store_true",
                   help="the Xpressor reads a learned mix of every encoder layer (depth + 1 extra weights), "
                        "not the last layer only")
    p.add_argument("--ema-decay", type=float, metavar="D",
                   help="keep an exponential moving average of the trained weights (e.g. 0.98) and use it")
    p.add_argument("--thinning", type=float, metavar="K",
                   help="augmentation: each training cell keeps each molecule with a probability drawn from "
                        "[K, 1] at every step (e.g. 0.5); off by default")
    p.add_argument("--correction", choices=("adversarial", "mmd"), default="mmd",
                   help="slide penalty of batch_correction (default mmd)")
    p.add_argument("--correction-weight", type=float, default=1.0)
    p.add_argument("--structure-weight", type=float, metavar="W",
                   help="batch_correction: keep the inner products between cells of the same slide where the "
                        "pretrained model had them, with this weight (default 1; 0 = off)")
    p.add_argument("--reconstruction-weight", type=float, help="default 0 for cell_type, 1 for batch_correction")
    p.add_argument("--epochs", type=int, default=10)  # checked by check_budget (its message names --epochs)
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--lr", type=positive_float, default=1e-3)
    p.add_argument("--counts-layer", help="layer with raw counts (default: X)")
    add_gene_symbols(p)
    p.add_argument("--table-key", help="SpatialData table to read (if several)")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--log-dir", help="directory for Lightning CSV logs")
    p.add_argument("--accelerator", default="auto", help="Lightning accelerator: auto, cpu, gpu")
    p.add_argument("--write-h5ad", metavar="PATH", help="also write the data with predicted labels "
                   "(obs['xscale_pred_<label-key>']) and fine-tuned latents (obsm['X_xscale_cell']); an existing "
                   "file is replaced only if xscale finetune wrote it, and never the input file")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _read(data: str, table_key: str | None = None, gene_symbols: str | None = None):
    """A bundled dataset by name, else an .h5ad file, AnnData zarr or SpatialData zarr (its table).
    Not validated here: ``finetune`` checks the counts (``counts_layer``) and the keys it uses."""
    from xscale.data.io import read_source

    return read_source(data, table_key=table_key, spatial_key=None, validate=False, gene_symbols=gene_symbols)


def _train_mask(adata, key: str | None, values: list[str] | None):
    import numpy as np

    from xscale.errors import XscaleInputError

    if key is None:
        if values:
            raise XscaleInputError("--train-values needs --train-key naming the obs column they refer to.")
        return None
    if key not in adata.obs:
        raise XscaleInputError(f"--train-key {key!r} not found in adata.obs. Available: {list(adata.obs.columns)}.")
    col = adata.obs[key]
    if values:
        mask = col.astype(str).isin(values).to_numpy()
        if not mask.any():
            raise XscaleInputError(
                f"No cell has obs[{key!r}] in {values}; found values such as {sorted(set(col.astype(str)))[:10]}."
            )
        return mask
    if col.dtype != bool:
        raise XscaleInputError(f"obs[{key!r}] is {col.dtype}, not boolean; "
                               "pass --train-values V [V ...] to pick training cells.")
    return np.asarray(col, dtype=bool)


#: uns key marking an .h5ad written by ``--write-h5ad``: only such a file is replaced.
H5AD_MARK = "xscale_finetune"


def _h5ad_written_by_finetune(path) -> bool:
    """True for an .h5ad whose uns holds :data:`H5AD_MARK` (read with h5py; X is not loaded)."""
    try:
        import h5py

        with h5py.File(path, "r") as f:
            return "uns" in f and H5AD_MARK in f["uns"]
    except (OSError, ValueError):
        return False


def _check_h5ad_target(path: str, data: str | None = None) -> None:
    """--write-h5ad must name a file path (missing folders are made), not a directory, not the input file, and
    not an existing file that xscale finetune did not write (the user's data)."""
    import os
    from pathlib import Path

    from xscale.errors import XscaleInputError

    target = Path(path)
    if target.is_dir():
        raise XscaleInputError(f"--write-h5ad {path!r}: expected a file path (e.g. {target / 'cells.h5ad'}), "
                               "found a directory.")
    if target.suffix != ".h5ad":
        raise XscaleInputError(f"--write-h5ad {path!r}: expected a path ending in .h5ad, found {target.suffix!r}.")
    if not (target.exists() or target.is_symlink()):
        return
    if data is not None and Path(data).exists():
        try:
            same = os.path.samefile(target, data)
        except OSError:
            same = False
        if same:
            raise XscaleInputError(f"--write-h5ad {path!r}: expected a new path, found the input data file itself; "
                                   "xscale does not overwrite your input. Pass another path (e.g. "
                                   f"{target.with_name(target.stem + '_finetuned.h5ad')}).")
    if target.is_symlink() or not _h5ad_written_by_finetune(target):
        raise XscaleInputError(f"--write-h5ad {path!r}: expected a new path or an .h5ad written by an earlier "
                               "xscale finetune, found an existing file that xscale did not write (your data?). "
                               "Pass another path, or move the file away yourself.")


def run(args: argparse.Namespace) -> int:
    import json

    from xscale.train.finetune import encode_cells, finetune, predict_labels
    from xscale.utils.device import check_accelerator

    check_accelerator(args.accelerator)
    from xscale.cli.run import check_budget

    check_budget(args.epochs, -1, epochs_option="--epochs")
    from xscale.train.finetune import check_output_dir

    check_output_dir(args.out, option="--out")  # before reading or training: only what finetune wrote is replaced
    if args.write_h5ad:  # before training: a path that cannot take the file fails now, not after
        _check_h5ad_target(args.write_h5ad, args.data)
    import xscale.datasets as ds

    # a bundled dataset's slide key is the default --slide-key (as for run / prepare / embed)
    slide_key = args.slide_key or (ds.info(args.data).slide_key if args.data in ds.DATASETS else None)
    adata = _read(args.data, args.table_key, args.gene_symbols)
    result = finetune(
        args.model, adata, task=args.task, label_key=args.label_key, slide_key=slide_key,
        train_mask=_train_mask(adata, args.train_key, args.train_values), trainable=args.trainable,
        layer_mix=args.layer_mix, ema_decay=args.ema_decay, thinning=args.thinning,
        correction=args.correction, correction_weight=args.correction_weight, structure_weight=args.structure_weight,
        reconstruction_weight=args.reconstruction_weight, max_epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr, counts_layer=args.counts_layer, seed=args.seed, output_dir=args.out, log_dir=args.log_dir,
        accelerator=args.accelerator, progress=not args.no_progress,
    )
    summary = {"trainable_fraction": round(result.trainable_fraction, 4), **result.metrics,
               "out": str(result.output_dir)}
    print(json.dumps(summary))
    if args.write_h5ad:
        from pathlib import Path

        if result.head is not None:
            predict_labels(result.model, result.head, adata, key_added=f"xscale_pred_{args.label_key}",
                           counts_layer=args.counts_layer)
        adata.obsm["X_xscale_cell"] = encode_cells(result.model, adata,
                                                   counts_layer=args.counts_layer).reshape(adata.n_obs, -1)
        adata.uns[H5AD_MARK] = {"model": str(args.model), "task": args.task, "out": str(result.output_dir)}
        target = Path(args.write_h5ad)
        _check_h5ad_target(args.write_h5ad, args.data)  # again before the swap: it may have appeared meanwhile
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp.h5ad")
        try:
            adata.write_h5ad(tmp)
            tmp.replace(target)
        finally:
            tmp.unlink(missing_ok=True)
        print(f"wrote {target}")
    return 0
