"""Command-line options that several sub-commands share."""
from __future__ import annotations

import argparse


def add_gene_symbols(p: argparse.ArgumentParser) -> None:
    """``--gene-symbols COLUMN``: the var column of gene symbols, for files whose var_names hold IDs."""
    p.add_argument("--gene-symbols", metavar="COLUMN",
                   help="var column of gene symbols when var_names hold IDs (e.g. CELLxGENE's feature_name, "
                        "beside Ensembl IDs); it becomes the gene names, the IDs go to var['xscale_var_id']")


def refuse_gene_symbols_for_store(args: argparse.Namespace) -> None:
    """A prepared store's genes were fixed by ``xscale prepare``: --gene-symbols has no say there."""
    from xscale.errors import XscaleInputError

    if getattr(args, "gene_symbols", None) is not None:
        raise XscaleInputError(f"--gene-symbols: {args.data} is a prepared store, whose genes xscale prepare fixed; "
                               "expected no --gene-symbols, found it. Pass it to xscale prepare instead.")
