"""``xscale pipeline PIPELINE.yaml --out DIR``: run a declarative multi-step pipeline (pipelines/*.yaml).

Also reachable as ``python -m xscale.pipelines``. Each step writes ``DIR/manifests/STEP.json``
and is skipped on re-run when its outputs are complete and its parameters unchanged.
"""
from __future__ import annotations

import argparse

HELP = "run a declarative pipeline (pipelines/*.yaml); complete steps are skipped on re-run"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pipeline", help="pipeline YAML (pipelines/*.yaml)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--force", action="store_true", help="re-run complete steps")
    parser.add_argument("--only", nargs="+", help="run only these steps")
    parser.add_argument("--var", action="append", default=[], metavar="NAME=VALUE", help="override a vars: entry")


def run(args: argparse.Namespace) -> int:
    import yaml

    from xscale.errors import XscaleInputError
    from xscale.pipelines.runner import run_pipeline

    variables = {}
    for item in args.var:
        name, sep, value = item.partition("=")
        if not sep:
            raise XscaleInputError(f"--var {item!r} is not NAME=VALUE.")
        variables[name] = yaml.safe_load(value)
    done = run_pipeline(args.pipeline, args.out, force=args.force, only=args.only, variables=variables)
    for step, man in done.items():
        status = "skipped (complete)" if man["skipped"] else f"ran in {man['seconds']:.1f}s"
        print(f"{step}: {status}")
    return 0
