"""``xscale query``: nearest cells or niches in a latent store."""
from __future__ import annotations

import argparse
import sys

HELP = "find the nearest cells or niches to a cell, a vector or a region in a latent store"
DESCRIPTION = """\
Search a latent store (cells.zarr written by `xscale demo`, `run` or `embed`) with a faiss
index: exact for small stores, approximate (IVF) above --exact-max cells.

  --cell ID        the cell's latent (the cell itself is left out of the hits);
                   at --level niche, the niche centred on that cell
  --vector F.npy   any latent of the level's size, (K, D) or flat
  --region x0,y0,x1,y1
                   an inclusive box on one slide (--region-slide, or the only slide):
                   --region-mode mean searches with the mean latent of the box's cells and
                   leaves those cells out (similar regions elsewhere); cells lists the box's
                   own cells, nearest to their mean first

--slide S keeps hits on slide S only; --cross-slide drops hits on the query's own slide (a --cell
or --region query; with --region-mode cells neither applies).
Output: JSON list of hits (id, distance = L2 in latent space, slide, x, y, then the store's
obs columns), or TSV with the same columns. --decode CHECKPOINT (level-1 model directory;
cell level) adds each hit's decoded expression: "expected", {gene: expected counts at
--library total counts} for --genes, or the 10 highest genes.

example: xscale query --store xscale-demo/cells.zarr --level niche --cell CELL --k 10 --cross-slide
"""


def _box(text: str) -> tuple[float, float, float, float]:
    parts = text.split(",")
    try:
        vals = tuple(float(p) for p in parts)
    except ValueError:
        vals = ()
    if len(vals) != 4:
        raise argparse.ArgumentTypeError(f"expected x0,y0,x1,y1 (four numbers); got {text!r}")
    return vals  # type: ignore[return-value]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--store", required=True, help="latent store (DIR/cells.zarr)")
    p.add_argument("--level", choices=("cell", "niche"), default="cell", help="which latents to search (default cell)")
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--cell", metavar="ID", help="query with this cell's latent")
    q.add_argument("--vector", metavar="FILE.npy", help="query with a latent saved by numpy.save")
    q.add_argument("--region", type=_box, metavar="x0,y0,x1,y1", help="query with a region's cells")
    p.add_argument("--k", type=int, default=10, help="number of hits (default 10)")
    p.add_argument("--slide", help="keep hits on this slide only")
    p.add_argument("--cross-slide", action="store_true", help="leave out hits on the query's own slide")
    p.add_argument("--region-slide", help="slide the --region box is drawn on (default: the only slide)")
    p.add_argument("--region-mode", choices=("mean", "cells"), default="mean", help="see above (default mean)")
    p.add_argument("--slide-key", help="obs column naming the slide (default: detected)")
    p.add_argument("--index", choices=("auto", "flat", "ivf", "hnsw"), default="auto", help="faiss index kind")
    p.add_argument("--exact-max", type=int, default=100_000, help="largest store searched exactly by --index auto")
    p.add_argument("--format", choices=("json", "tsv"), default="json", help="output format (default json)")
    p.add_argument("--decode", metavar="CHECKPOINT", help="level-1 model directory: add decoded expression per hit")
    p.add_argument("--genes", help="comma-separated genes to report with --decode (default: the 10 highest)")
    p.add_argument("--library", type=float, default=1e4, help="total counts of --decode expectations (default 1e4)")
    p.add_argument("--output", "-o", help="write here instead of stdout (a new file; see --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="let --output replace an existing file")


def hits_to_text(hits: list, fmt: str) -> str:
    """Hits as a JSON list or a TSV table (same columns; a decoded ``expected`` dict becomes one
    column per gene, ``expected.GENE``)."""
    import json

    rows = [h.to_dict() for h in hits]
    if fmt == "json":
        return json.dumps(rows, indent=1)
    import pandas as pd

    cols = ["id", "distance", "slide", "x", "y"]
    df = pd.json_normalize(rows, sep=".") if rows else pd.DataFrame()  # --decode's {gene: counts}: expected.GENE
    df = df[cols + [c for c in df.columns if c not in cols]] if len(df) else pd.DataFrame(columns=cols)
    return df.to_csv(sep="\t", index=False)


def _add_decoded(index, hits: list, args: argparse.Namespace) -> None:
    """Put ``{gene: expected counts}`` of each hit's decoded cell latent into ``hit.obs["expected"]``."""
    from xscale.errors import XscaleInputError
    from xscale.query import decode_hit
    from xscale.query.decode import load_level1

    if index.store.level != "cell":
        raise XscaleInputError("--decode decodes cell latents; use it with --level cell.")
    model = load_level1(args.decode)
    genes = [g.strip() for g in args.genes.split(",") if g.strip()] if args.genes else None
    unknown = [g for g in genes or [] if g not in model.vocab]
    if unknown:
        raise XscaleInputError(f"--genes {unknown} are not in the level-1 model's vocabulary of "
                               f"{len(model.vocab)} genes.")
    for hit in hits:
        expected = decode_hit(index, hit, model, library=args.library)  # the whole panel shares the library
        shown = expected.reindex([g.upper() for g in genes]) if genes else expected.nlargest(10)
        if genes:
            shown.index = genes
        hit.obs["expected"] = {str(g): round(float(v), 4) for g, v in shown.items()}


def check_output(path: str, overwrite: bool) -> None:
    """--output must be a file path: not a directory, and not an existing file unless --overwrite says so."""
    from pathlib import Path

    from xscale.errors import XscaleInputError

    target = Path(path)
    if target.is_dir():
        raise XscaleInputError(f"--output {path!r}: expected a file path (e.g. {target / 'hits.json'}), found a "
                               "directory. Pass a file path.")
    if (target.exists() or target.is_symlink()) and not overwrite:
        raise XscaleInputError(f"--output {path!r}: expected a new file, found an existing one. Pass --overwrite to "
                               "replace it, or another path.")


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from xscale.errors import XscaleInputError
    from xscale.query import LatentIndex

    if args.k < 1:
        raise XscaleInputError(f"--k must be >= 1; got {args.k}.")
    if args.vector is not None and args.cross_slide:  # before the store is opened
        raise XscaleInputError("--cross-slide: a --vector has no slide of its own to leave out; use --slide S to "
                               "keep the hits of one slide, or query with --cell / --region.")
    if args.output:  # before the store is opened: a path that cannot take the hits fails first
        check_output(args.output, args.overwrite)
    index = LatentIndex.open(
        args.store, level=args.level, slide_key=args.slide_key, kind=args.index, exact_max=args.exact_max
    )
    if args.cell is not None:
        hits = index.query_cell(args.cell, args.k, slide=args.slide, cross_slide=args.cross_slide)
    elif args.vector is not None:
        try:
            vec = np.load(args.vector, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise XscaleInputError(f"Could not read --vector {args.vector!r} as a .npy array: {err}") from err
        hits = index.query_vector(vec, args.k, slide=args.slide)
    else:
        hits = index.query_region(
            args.region, args.k, region_slide=args.region_slide, slide=args.slide,
            cross_slide=args.cross_slide, mode=args.region_mode,
        )
    if args.decode:
        _add_decoded(index, hits, args)
    text = hits_to_text(hits, args.format)
    if args.output:
        from xscale.utils.atomic import atomic_write_text

        atomic_write_text(args.output, text + "\n")
    else:
        sys.stdout.write(text + "\n")
    return 0
