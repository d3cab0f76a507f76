"""``python -m xscale.pipelines PIPELINE.yaml --out DIR [--var NAME=VALUE] [--force] [--only STEP ...]``."""
from __future__ import annotations

from xscale.pipelines.runner import main

raise SystemExit(main())
