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


def options_given(args: argparse.Namespace, defaults: dict[str, object]) -> list[str]:
    """The options among ``defaults`` (dest -> default) that ``args`` sets to something else, as written on the
    command line (``--slide-key``): those a prepared store answers itself, for run and embed to refuse."""
    return [f"--{k.replace('_', '-')}" for k, default in defaults.items() if getattr(args, k) != default]


def _number(kind: type, text: str, expected: str):
    try:
        return kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected {expected}, found {text!r}") from None


def positive_int(text: str) -> int:
    """argparse ``type=``: an integer >= 1 (argparse names the option in its one-line error)."""
    value = _number(int, text, "an integer >= 1")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, found {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse ``type=``: an integer >= 0."""
    value = _number(int, text, "an integer >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, found {value}")
    return value


#: Largest random seed numpy accepts (2**32 - 1).
MAX_SEED = 2**32 - 1


def seed_int(text: str) -> int:
    """argparse ``type=``: a random seed, 0..2**32-1 (what numpy and Lightning accept)."""
    value = _number(int, text, f"an integer seed 0..{MAX_SEED}")
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected an integer seed 0..{MAX_SEED}, found {value}")
    return value


def positive_float(text: str) -> float:
    """argparse ``type=``: a finite number > 0."""
    import math

    value = _number(float, text, "a number > 0")
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, found {text!r}")
    return value
