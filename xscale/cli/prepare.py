"""``xscale prepare``: convert a dataset to a chunked, spatially ordered zarr store."""
from __future__ import annotations

import argparse

from xscale.cli.options import add_gene_symbols, positive_float, positive_int

HELP = "convert .h5ad / AnnData zarr / SpatialData zarr into a chunked xscale zarr store"
DESCRIPTION = (
    "Validate a dataset and write one chunked zarr store: counts as CSR by cell blocks, cells "
    "ordered by slide and along a space-filling curve, the per-slide spatial neighbour graph, "
    "the gene list and per-slide metadata. Built block by block (never the whole matrix in "
    "memory), written under a temporary name and renamed when complete. The store opens with "
    "anndata.read_zarr and streams with xscale.data.stream.CellStream / NicheStream."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="input .h5ad file, AnnData .zarr or SpatialData .zarr store, or a bundled "
                        "dataset name (e.g. starmap_mpfc; its slide key is the default --slide-key)")
    parser.add_argument("output", help="store to create, e.g. data.xscale.zarr")
    parser.add_argument("--table-key", default=None, help="SpatialData table to use (if several)")
    parser.add_argument("--spatial-key", default="spatial",
                        help="obsm key of the coordinates (default: spatial); 'none' for non-spatial data")
    parser.add_argument("--counts-layer", default=None, help="layer holding raw counts when X is normalised")
    add_gene_symbols(parser)
    parser.add_argument("--slide-key", default=None, help="obs column naming each cell's slide")
    parser.add_argument("--chunk-cells", type=positive_int, default=8192, help="cells per block (default: 8192)")
    parser.add_argument("--curve", choices=("hilbert", "morton", "random"), default="hilbert",
                        help="cell order within a slide (random: a shuffled baseline)")
    parser.add_argument("--n-neighbors", type=positive_int, default=15, action=_Given,
                        help="k of the spatial kNN graph (default: 15, the niche size of the small level-2 preset "
                             "minus its centre; the base preset needs 31)")
    parser.add_argument("--radius", type=positive_float, default=None,
                        help="radius graph instead of kNN, in median nearest-neighbour distances")
    parser.add_argument("--workers", type=positive_int, default=2, help="dask threads reading blocks (default: 2)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output store")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


class _Given(argparse.Action):
    """Store the value and record that the option was given (``<dest>_given``): its default stays the function's."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, values)
        setattr(namespace, f"{self.dest}_given", True)


def run(args: argparse.Namespace) -> int:
    import xscale.datasets as ds
    from xscale.data.prepare import prepare
    from xscale.data.store import CellStore
    from xscale.errors import XscaleInputError

    spatial_key = None if str(args.spatial_key).lower() == "none" else args.spatial_key
    if args.radius is not None and getattr(args, "n_neighbors_given", False):
        raise XscaleInputError(
            f"--radius {args.radius:g} and --n-neighbors {args.n_neighbors}: expected one of them (a radius graph, or "
            "k nearest neighbours), found both; a radius graph takes every cell within the radius, so k would be "
            "ignored. Leave one out.")
    ds.check_source(args.input)
    source, slide_key = ds.resolve(args.input, args.slide_key)
    out = prepare(
        source, args.output, table_key=args.table_key, spatial_key=spatial_key,
        counts_layer=args.counts_layer, slide_key=slide_key, chunk_cells=args.chunk_cells,
        curve=args.curve, n_neighbors=args.n_neighbors, radius=args.radius, n_workers=args.workers,
        overwrite=args.overwrite, progress=not args.no_progress, gene_symbols=args.gene_symbols,
    )
    store = CellStore(out)
    print(f"{out}: {store.n_cells} cells x {store.n_genes} genes, {len(store.slide_names)} slide(s), "
          f"{store.n_chunks} blocks of {store.chunk_cells} cells")
    return 0
