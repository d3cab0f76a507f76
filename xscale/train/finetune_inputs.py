"""What :func:`xscale.train.finetune.finetune` reads from its arguments, checked before any work:
options, the training cells, cell-type labels and the slides of a correction."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from xscale.data.validate import check_slides
from xscale.errors import XscaleInputError

if TYPE_CHECKING:
    import anndata as ad


def train_cells(adata: ad.AnnData, train_mask: np.ndarray | str | None) -> np.ndarray:
    """(n_obs,) bool: the cells to train on, from a boolean array, a boolean obs column or None (all)."""
    if train_mask is None:
        return np.ones(adata.n_obs, dtype=bool)
    if isinstance(train_mask, str):
        if train_mask not in adata.obs:
            raise XscaleInputError(
                f"train_mask={train_mask!r} not found in adata.obs. Available: {list(adata.obs.columns)}. "
                "Pass a boolean obs column or a boolean array of length n_obs."
            )
        train_mask = adata.obs[train_mask].to_numpy()
    mask = np.asarray(train_mask)
    if mask.dtype != bool or mask.shape != (adata.n_obs,):
        raise XscaleInputError(
            f"train_mask must be boolean of shape ({adata.n_obs},); found dtype {mask.dtype}, shape {mask.shape}."
        )
    if not mask.any():
        raise XscaleInputError("train_mask selects no cell; select the cells to train on.")
    return mask


def cell_type_codes(adata: ad.AnnData, label_key: str | None, train: np.ndarray) -> tuple[np.ndarray, tuple[str, ...]]:
    """((n_obs,) class index, -1 where unlabelled or a class unseen in training; the training cells' classes)."""
    if label_key is None or label_key not in adata.obs:
        raise XscaleInputError(
            f"task='cell_type' needs label_key naming an obs column; got {label_key!r}. "
            f"Available: {list(adata.obs.columns)}."
        )
    col = adata.obs[label_key]
    known = col.notna().to_numpy()
    names = col.astype(str).to_numpy()
    classes = tuple(sorted(set(names[train & known])))
    if len(classes) < 2:
        raise XscaleInputError(
            f"adata.obs[{label_key!r}] has {len(classes)} label(s) among the training cells; at least 2 are needed."
        )
    lookup = {c: i for i, c in enumerate(classes)}
    codes = np.array([lookup.get(n, -1) if k else -1 for n, k in zip(names, known, strict=True)], dtype=np.int64)
    return codes, classes


# batch_correction's default: a guard against collapsed latents. On benchmarks/peft.py's STARmap
# tuning runs (MMD 1, 12 epochs) it scored as the run's choice without it: mixing gain 0.035 vs
# 0.038, purity drop -0.006 vs -0.001, with more of the latents' spread kept (0.89x vs 0.79x).
DEFAULT_STRUCTURE_WEIGHT = 1.0


def check_options(task: str, correction: str, structure_weight: float | None,
                  reconstruction_weight: float | None, thinning: float | None, layer_mix: bool,
                  trainable: str) -> float:
    """:func:`finetune`'s options, checked before any work; returns the structure weight to use."""
    if task not in ("cell_type", "batch_correction"):
        raise XscaleInputError(f"task must be 'cell_type' or 'batch_correction'; got {task!r}.")
    if correction not in ("adversarial", "mmd"):
        raise XscaleInputError(f"correction must be 'adversarial' or 'mmd'; got {correction!r}.")
    if structure_weight is None:
        structure_weight = DEFAULT_STRUCTURE_WEIGHT if task == "batch_correction" else 0.0
    if not structure_weight >= 0:
        raise XscaleInputError(f"structure_weight: expected a weight >= 0, found {structure_weight}.")
    if reconstruction_weight is not None and not reconstruction_weight >= 0:
        raise XscaleInputError(f"reconstruction_weight: expected a weight >= 0, found {reconstruction_weight}. "
                               "Pass None for the task's default (0 for cell_type, 1 for batch_correction).")
    if structure_weight > 0 and task != "batch_correction":
        raise XscaleInputError(f"structure_weight: only task='batch_correction' uses it, found task={task!r} "
                               f"with structure_weight={structure_weight}. Pass structure_weight=0.")
    if thinning is not None and not 0.0 < thinning <= 1.0:
        raise XscaleInputError(f"thinning: expected the lowest keep fraction in (0, 1] such as 0.5, found {thinning}. "
                               "Pass None to train on the cells as measured.")
    if layer_mix and trainable == "head":
        raise XscaleInputError("layer_mix=True adds a mix over encoder layers that must be learned, but "
                               "trainable='head' trains nothing in the model: the mix would stay at its uniform "
                               "start. Pass trainable='xpressor' (or 'all'), or layer_mix=False.")
    return structure_weight


def correction_slides(adata: ad.AnnData, slide_key: str | None, label_key: str | None,
                      train: np.ndarray) -> list[str]:
    """batch_correction's keys checked; the names of the slides among the training cells (>= 2)."""
    if slide_key is None or slide_key not in adata.obs:
        raise XscaleInputError(
            f"task='batch_correction' needs slide_key naming an obs column; got {slide_key!r}. "
            f"Available: {list(adata.obs.columns)}."
        )
    check_slides(adata, slide_key)  # a missing label is not a slide named "nan"
    if label_key is not None and label_key not in adata.obs:
        raise XscaleInputError(f"label_key {label_key!r}: expected an obs column of cell types (a slide "
                               "correction only scores them, before and after), found none. Available: "
                               f"{list(adata.obs.columns)}. Pass label_key=None to skip that check.")
    slide_names = sorted(set(adata.obs[slide_key].astype(str)[train]))
    if len(slide_names) < 2:
        raise XscaleInputError(f"adata.obs[{slide_key!r}] has {len(slide_names)} slide(s) among the training "
                               "cells; need >= 2.")
    return slide_names
