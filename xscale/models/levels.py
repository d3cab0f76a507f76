"""The ``model`` argument of user-facing functions: a loaded model or a saved model's directory.

``embed_cells(adata, model)`` and its siblings take either a model object or a path, and
check that the model is of the level they need, so that passing the level-2 model where
level 1 belongs (or a run folder instead of a model folder) stops with one clear line
instead of an ``AttributeError`` deep inside the forward pass.

A path may name the model directory itself (``config.json`` + ``model.safetensors``),
the folder holding it as ``model/`` (``RUN/checkpoints/level1``), a run's checkpoints
folder holding ``level1/`` and ``level2/`` (``RUN/checkpoints``), or the run folder itself
(``RUN``, as written by ``xscale run`` and ``xscale demo``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from torch import nn

from xscale.errors import XscaleInputError

Level = Literal[1, 2]

# level -> (class name, what it maps)
_LEVELS: dict[int, tuple[str, str]] = {1: ("GeneToCell", "genes -> cells"), 2: ("CellToTissue", "cells -> niches")}


def find_model_dir(path: str | os.PathLike) -> Path | None:
    """``path`` itself or ``path/model`` when it holds a saved model (``config.json``), else None."""
    from xscale.models.io import CONFIG

    path = Path(path)
    for cand in (path, path / "model"):
        if (cand / CONFIG).is_file():
            return cand
    return None


def _model_class(level: Level) -> type[nn.Module]:
    if level == 1:
        from xscale.models.gene_to_cell import GeneToCell

        return GeneToCell
    from xscale.models.cell_to_tissue import CellToTissue

    return CellToTissue


def _listing(path: Path) -> str:
    if not path.exists():
        return "it does not exist"
    if not path.is_dir():
        return "it is a file"
    names = sorted(p.name for p in path.iterdir())
    return f"it holds {names[:10]}" + (f" and {len(names) - 10} more" if len(names) > 10 else "")


def as_level_model(model: nn.Module | str | os.PathLike, level: Level, what: str) -> nn.Module:
    """``model`` as a loaded model of ``level`` (1: GeneToCell, 2: CellToTissue).

    A path is loaded (see the module docstring for the folders accepted). A model of the
    other level, or anything else, raises :class:`~xscale.errors.XscaleInputError` naming
    ``what`` (the calling function), the expected class and the one found.
    """
    from xscale.models.io import load_model

    name, maps = _LEVELS[level]
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        sub = f"level{level}"
        candidates = (find_model_dir(d) for d in (path, path / sub, path / "checkpoints" / sub))
        found = next((d for d in candidates if d is not None), None)
        if found is None:
            raise XscaleInputError(
                f"{what}: {str(path)!r} is not a saved level-{level} model: no config.json there, in model/, "
                f"{sub}/model/ or checkpoints/{sub}/model/ ({_listing(path)}). Pass the model directory "
                f"saved by xscale (e.g. RUN/checkpoints/{sub}/model) or a loaded model."
            )
        model = load_model(found)
    cls = _model_class(level)
    if not isinstance(model, cls):
        other = {1: 2, 2: 1}[level]
        is_other = type(model).__name__ == _LEVELS[other][0]
        hint = (f"that is the level-{other} model; pass the level-{level} one (RUN/checkpoints/level{level}/model)"
                if is_other else f"load one with xscale.models.io.load_model(RUN/checkpoints/level{level}/model)")
        raise XscaleInputError(
            f"{what} needs the level-{level} model ({name}, {maps}); got a {type(model).__name__}: {hint}."
        )
    return model
