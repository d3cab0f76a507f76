"""``xscale``: one entry point, one module per sub-command.

Each sub-command module (``xscale/cli/<name>.py``) defines ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``. Modules import only argparse-level
things at import time; heavy libraries (torch, lightning, squidpy) are imported inside
``run`` so that ``xscale --help`` answers quickly.

User errors (:class:`xscale.errors.XscaleInputError`) print one line and exit with
status 2; ``--debug`` shows the traceback.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from types import ModuleType

# Order shown in --help: the main job first, then the pipeline steps.
COMMANDS = ("demo", "run", "prepare", "fit", "embed", "query", "domains", "finetune", "pipeline")


def _load(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(f"xscale.cli.{name}")
    except ModuleNotFoundError as err:
        if err.name == f"xscale.cli.{name}":
            return None
        raise


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, ModuleType]]:
    from xscale import __version__

    parser = argparse.ArgumentParser(
        prog="xscale",
        description="Cross-scale representation learning for spatial transcriptomics "
        "(genes -> cells -> tissue niches).",
    )
    parser.add_argument("--version", action="version", version=f"xscale {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug-level logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules: dict[str, ModuleType] = {}
    for name in COMMANDS:
        mod = _load(name)
        if mod is None:
            continue
        p = sub.add_parser(name, help=mod.HELP, description=getattr(mod, "DESCRIPTION", mod.HELP))
        mod.add_arguments(p)
        modules[name] = mod
    return parser, modules


def main(argv: list[str] | None = None) -> int:
    parser, modules = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # Lightning attaches its own console handler to the "lightning" logger on import; stop
    # its records from also reaching the root handler, or every Lightning line prints twice.
    logging.getLogger("lightning").propagate = False
    # faiss reports at INFO which CPU build it loaded, with a traceback-like line when the AVX2
    # build is absent (the generic one then works): not news for the user unless --verbose.
    if not args.verbose:
        logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    from xscale.errors import XscaleInputError

    try:
        return int(modules[args.command].run(args) or 0)
    except XscaleInputError as err:
        if args.debug:
            raise
        print(f"xscale {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"xscale {args.command}: interrupted", file=sys.stderr)
        return 130
    except SystemExit as exit_:
        # Lightning answers Ctrl-C during training by tearing down and calling sys.exit(1)
        if isinstance(exit_.__context__, KeyboardInterrupt):
            print(f"xscale {args.command}: interrupted (checkpoints saved so far are kept; re-run to resume)",
                  file=sys.stderr)
            return 130
        raise


if __name__ == "__main__":
    sys.exit(main())
