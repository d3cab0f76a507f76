"""``python -m xscale.pipelines PIPELINE.yaml --out DIR [--var NAME=VALUE] [--force] [--only STEP ...]``.

The same as ``xscale pipeline ...`` (errors exit with status 2 and one line).
"""
from __future__ import annotations

import sys

from xscale.cli.main import main

raise SystemExit(main(["pipeline", *sys.argv[1:]]))
