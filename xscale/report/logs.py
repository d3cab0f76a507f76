"""Read Lightning ``CSVLogger`` histories (``<dir>/<name>/version_<n>/metrics.csv``)."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Union

from xscale.errors import XscaleInputError

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

HistorySource = Union[str, Path, "pd.DataFrame"]


def _version_key(p: Path) -> tuple[int, str]:
    m = re.search(r"version_(\d+)", str(p))
    return (int(m.group(1)) if m else -1, str(p))


def _run_dir(f: Path) -> Path:
    """The run folder of a ``metrics.csv``: the parent of its ``version_<n>`` folder, if any."""
    return f.parent.parent if re.fullmatch(r"version_\d+", f.parent.name) else f.parent


def run_metrics_csvs(path: str | Path) -> list[Path]:
    """``metrics.csv`` files of one run, oldest version first.

    ``path`` is a file (just that one) or a folder: the run of the newest ``metrics.csv``
    under it, with every version of that run (a resumed fit logs to a new version).
    """
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        return []
    found = sorted(p.rglob("metrics.csv"), key=_version_key)
    if not found:
        return []
    run = _run_dir(found[-1])
    return [f for f in found if _run_dir(f) == run]


def discover_histories(root: str | Path) -> dict[str, Path]:
    """Every run folder under a logs folder, named by its path below ``root``.

    ``logs/level1/version_0/metrics.csv`` and ``logs/level2/version_3/metrics.csv`` give
    ``{"level1": logs/level1, "level2": logs/level2}``;
    ``checkpoints/level1/logs/level1/version_0/metrics.csv`` under ``checkpoints`` is named
    ``level1`` too (the first folder below ``root``), unless two runs share that folder, in
    which case their whole relative paths name them.
    """
    root = Path(root)
    runs: dict[str, Path] = {}
    for f in root.rglob("metrics.csv"):
        run = _run_dir(f)
        rel = run.relative_to(root) if run != root else Path(root.name)
        runs.setdefault("/".join(rel.parts) or root.name, run)
    firsts = [name.split("/")[0] for name in runs]
    named = {
        (name.split("/")[0] if firsts.count(name.split("/")[0]) == 1 else name): run
        for name, run in runs.items()
    }
    return dict(sorted(named.items()))


def stitch_versions(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """One history from a run's versions, oldest first.

    A version that starts at a step an earlier one already reached replaces those rows
    (a resumed fit continues the curve; a fit restarted from scratch replaces it).
    """
    import pandas as pd

    out = frames[0]
    for nxt in frames[1:]:
        if "step" not in nxt.columns or "step" not in out.columns or nxt["step"].isna().all():
            out = nxt
            continue
        out = pd.concat([out[out["step"] < nxt["step"].min()], nxt], ignore_index=True)
    return out


def read_history(source: HistorySource) -> pd.DataFrame:
    """One run's metrics (columns as logged: ``step``, ``epoch``, ``train/loss``, ...).

    ``source``: a DataFrame, a ``metrics.csv``, or a run folder (versions stitched together).
    """
    import pandas as pd

    if isinstance(source, pd.DataFrame):
        return source
    files = run_metrics_csvs(source)
    if not files:
        raise XscaleInputError(
            f"history: no Lightning metrics.csv found at {str(source)!r}. Pass the CSVLogger folder "
            "of a run (e.g. 'out/logs/level1') or its metrics.csv."
        )
    log.debug("reading training history %s", files)
    return stitch_versions([pd.read_csv(f) for f in files])


def load_histories(
    history: Mapping[str, HistorySource] | str | Path | None,
) -> dict[str, pd.DataFrame]:
    """``{level name: metrics DataFrame}`` from a mapping of sources, or a logs folder to search.

    A mapped run without a ``metrics.csv`` (e.g. a run shorter than Lightning's logging
    interval logs nothing) gets an empty DataFrame and a warning, so a finished pipeline
    still gets its report; the report names the runs without logs.
    """
    import pandas as pd

    if history is None:
        return {}
    if isinstance(history, (str, Path)):
        root = Path(history)
        if not root.exists():
            raise XscaleInputError(
                f"history: {str(root)!r} does not exist. Pass a logs folder holding Lightning "
                "CSVLogger runs, or a dict {level name: folder or metrics.csv}."
            )
        history = discover_histories(root)
    out: dict[str, pd.DataFrame] = {}
    for name, src in history.items():
        try:
            out[str(name)] = read_history(src)
        except XscaleInputError as e:
            log.warning("%s", e)
            out[str(name)] = pd.DataFrame()
    return out


def loss_columns(df: pd.DataFrame, *, max_columns: int = 5) -> list[str]:
    """Columns to draw, most telling first: ``*loss``, then validation, then other training terms.

    Index-like columns (epoch, step, learning rates) are left out.
    """
    numeric = [
        c
        for c in df.columns
        if c not in ("epoch", "step")
        and not c.lower().startswith("lr")
        and df[c].dtype.kind in "fi"
        and df[c].notna().any()
    ]

    def rank(c: str) -> tuple[int, int]:
        lc = c.lower()
        return (
            0 if "loss" in lc else 1 if lc.startswith(("val", "valid")) else 2,
            numeric.index(c),
        )

    return sorted(numeric, key=rank)[:max_columns]
