"""Settings records of the stages of a staged run (see :mod:`xscale.train.staged`).

A finished stage records the settings it was made with (``<stage>.settings.json``); a stage
records them as started (``<stage>.started.json``) before it runs. A re-run compares its
settings with both and stops with an error naming the changed keys, instead of reusing stale
output or resuming another run's checkpoint.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from xscale.errors import XscaleInputError

log = logging.getLogger(__name__)


def settings_file(ckpt: Path, stage: str) -> Path:
    return ckpt / f"{stage}.settings.json"


def _jsonable(settings: dict) -> dict:
    """Settings as plain JSON values (model configs as saved in config.json, tuples as lists)."""
    import dataclasses

    from xscale.models.io import config_to_dict

    plain = {k: config_to_dict(v) if dataclasses.is_dataclass(v) else v for k, v in settings.items()}
    return json.loads(json.dumps(plain, default=list))


def started_file(ckpt: Path, stage: str) -> Path:
    return ckpt / f"{stage}.started.json"


def check_started(ckpt: Path, stage: str, settings: dict) -> None:
    """Before (re)starting ``stage``: stop if an interrupted earlier run of it used other settings, since
    its training would resume from that run's checkpoint; then record this run's settings as started."""
    path = started_file(ckpt, stage)
    if path.is_file():
        _compare(ckpt, stage, json.loads(path.read_text()), settings, interrupted=True)
    from xscale.utils.atomic import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(_jsonable(settings), indent=2, sort_keys=True))


def check_settings(ckpt: Path, stage: str, settings: dict) -> None:
    """Stop if ``stage`` finished earlier with other settings (those without a record are trusted)."""
    path = settings_file(ckpt, stage)
    if not path.is_file():
        log.warning("Stage %s finished earlier but has no settings record (%s); reusing it unchecked.", stage, path)
        return
    _compare(ckpt, stage, json.loads(path.read_text()), settings, interrupted=False)


_NEWER_KEYS = {"data_digest"}  # added after runs were recorded: absent from their records


def _compare(ckpt: Path, stage: str, before: dict, settings: dict, *, interrupted: bool) -> None:
    now = _jsonable(settings)
    # keys newer than the record (data_digest) are unknown for it, not changed
    changed = sorted(k for k in set(before) | set(now)
                     if before.get(k) != now.get(k) and not (k in _NEWER_KEYS and k not in before))
    if changed:
        def show(v) -> str:
            text = json.dumps(v)
            return text if len(text) <= 80 else text[:77] + "..."

        was = "started" if interrupted else "finished"
        details = "; ".join(f"{k}: {was} with {show(before.get(k))}, now {show(now.get(k))}" for k in changed[:6])
        if interrupted:
            raise XscaleInputError(
                f"Stage {stage!r} in {ckpt} was interrupted earlier with other settings ({details}); it would resume "
                f"from that run's checkpoint. Use a fresh out directory, or delete {ckpt / stage} and "
                f"{started_file(ckpt, stage).name} to start the stage afresh."
            )
        raise XscaleInputError(
            f"Stage {stage!r} in {ckpt} was finished with other settings ({details}). Its output would be stale. "
            f"Use a fresh out directory, or delete {ckpt / stage} and the stages after it to redo them."
        )


def record_settings(ckpt: Path, stage: str, settings: dict) -> None:
    from xscale.utils.atomic import atomic_write_text

    atomic_write_text(settings_file(ckpt, stage), json.dumps(_jsonable(settings), indent=2, sort_keys=True))
