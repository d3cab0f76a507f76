"""Resumable, pickle-safe Lightning training.

:func:`fit_resumable` is the one way xscale fits a LightningModule:

- a :class:`ResumableCheckpoint` callback writes ``<ckpt_dir>/last.ckpt`` every
  ``every_n_train_steps`` optimiser steps, after the last batch of every epoch and when
  training ends;
- every write goes through :class:`SafeCheckpointIO`: serialised to a temporary file in
  the same directory, fsync'ed, then ``os.replace``'d, so ``last.ckpt`` is always a
  complete checkpoint even if the process is SIGKILLed mid-write (Lightning's own
  writer goes through a temp file in ``/tmp`` and ``shutil.move``, which degrades to a
  non-atomic copy when ``/tmp`` is another file system);
- every read goes through :func:`load_lightning_checkpoint`, i.e.
  ``torch.load(..., weights_only=True)``: a checkpoint that would need arbitrary Python
  objects to load (e.g. a planted pickle) is refused with a :class:`CheckpointError`
  before anything is executed;
- hyperparameters and callback states are converted to plain data on save (dataclass
  configs to dicts, paths to strings), so xscale's own checkpoints always load with
  ``weights_only=True``;
- re-running with the same ``ckpt_dir`` resumes from ``last.ckpt`` (global step,
  optimiser, schedulers, loops); a run that had finished returns at once.

Resuming continues exactly where the interrupted run was (bit-identical to an uninterrupted
run on the same device) when the training data comes from a
:class:`~xscale.train.resumable_data.ResumableLoader` and the LightningModule stores its random
generators (:mod:`xscale.train.resumable_data`; xscale's level-1, level-2 and joint modules do).
With a plain (non-stateful) DataLoader a resume mid-epoch restarts that epoch's data iteration
(Lightning's behaviour); the global step and the optimiser continue.
"""
from __future__ import annotations

import dataclasses
import enum
import io
import logging
import os
import pickle
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.pytorch.callbacks import Callback

from xscale.errors import CheckpointError
from xscale.train.resumable_data import (  # re-exported: they were defined here first
    RNG_KEY,
    ResumableBatchSampler,
    ResumableLoader,
    apply_generator_state,
    flat_loaders,
    restore_rng_state,
    rng_state,
)
from xscale.utils.atomic import atomic_write_bytes, remove_stale_temps

if TYPE_CHECKING:
    import lightning

log = logging.getLogger(__name__)

LAST = "last.ckpt"
#: Keys every Lightning training checkpoint has; used to recognise one.
_REQUIRED_KEYS = ("state_dict", "global_step", "epoch")
_PRIMITIVES = (str, int, float, bool, type(None), bytes)
_TORCH_LEAVES = (torch.Tensor, torch.Size, torch.dtype, torch.device)


def to_plain(obj: Any, *, _path: str = "") -> Any:
    """Convert ``obj`` into data that ``torch.load(weights_only=True)`` accepts.

    Dicts/lists/tuples are walked; tensors, sizes, dtypes, devices and Python primitives
    are kept; dataclasses become dicts, paths and enums their string/value, numpy scalars
    and arrays Python numbers and tensors. Anything else becomes its ``repr`` with a
    warning naming where it was (``hyper_parameters.cfg...``).
    """
    if isinstance(obj, _PRIMITIVES) or isinstance(obj, _TORCH_LEAVES):
        return obj
    if isinstance(obj, dict):
        plain = {k if isinstance(k, (str, int)) else str(k): to_plain(v, _path=f"{_path}.{k}") for k, v in obj.items()}
        return OrderedDict(plain) if isinstance(obj, OrderedDict) else plain
    if isinstance(obj, (list, tuple)):
        items = [to_plain(v, _path=f"{_path}[{i}]") for i, v in enumerate(obj)]
        return tuple(items) if isinstance(obj, tuple) else items
    if isinstance(obj, (set, frozenset)):
        return [to_plain(v, _path=_path) for v in sorted(obj, key=repr)]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name), _path=f"{_path}.{f.name}") for f in dataclasses.fields(obj)}
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, enum.Enum):
        return to_plain(obj.value, _path=_path)
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if hasattr(obj, "items") and callable(obj.items):  # Mapping-likes such as AttributeDict
        return to_plain(dict(obj.items()), _path=_path)
    log.warning("Checkpoint value at %s of type %s stored as its repr (not plain data).", _path or "<root>",
                type(obj).__name__)
    return repr(obj)


def load_lightning_checkpoint(path: str | os.PathLike, *, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a Lightning ``.ckpt`` with ``torch.load(weights_only=True)``; never runs code.

    Parameters
    ----------
    path
        A checkpoint file written by Lightning (``trainer.save_checkpoint``).
    map_location
        Passed to ``torch.load``.

    Returns
    -------
    The checkpoint dict (``state_dict``, ``global_step``, ``epoch``, ``loops``, ...).

    Raises
    ------
    CheckpointError
        The file is missing, is not a torch checkpoint, is truncated/corrupted, needs
        arbitrary Python objects to unpickle (refused: that could run code), or is not a
        Lightning training checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path} does not exist or is not a file.")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"Refusing to load {path}: it needs Python objects beyond tensors and plain data to unpickle "
            f"({_first_line(err)}). Unpickling such a file can run arbitrary code, so xscale only reads "
            "checkpoints with torch.load(weights_only=True). Use checkpoints written by xscale, or models "
            "saved with xscale.models.io.save_model (safetensors + JSON)."
        ) from err
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, AttributeError, TypeError) as err:
        raise CheckpointError(
            f"Cannot read checkpoint {path}: {_first_line(err)}. The file is truncated, corrupted or not a "
            "PyTorch checkpoint; delete it (training then restarts from the beginning) or point to another one."
        ) from err
    if not isinstance(ckpt, dict) or any(key not in ckpt for key in _REQUIRED_KEYS):
        found = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(
            f"{path} is not a Lightning training checkpoint: expected keys {list(_REQUIRED_KEYS)}, found {found}."
        )
    return ckpt


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    # torch's weights_only message puts the offending global on a later line; keep it.
    hit = [line.strip() for line in text if "GLOBAL" in line or "Unsupported" in line]
    return (hit[0] if hit else (text[0] if text else type(err).__name__))[:300]


class SafeCheckpointIO(CheckpointIO):
    """Lightning ``CheckpointIO``: atomic local writes, ``weights_only=True`` reads.

    Saves convert the checkpoint with :func:`to_plain` first so it loads without pickle
    of arbitrary classes. Loads ignore a requested ``weights_only=False``.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("SafeCheckpointIO does not take storage_options.")
        plain = to_plain(checkpoint)
        buffer = io.BytesIO()
        torch.save(plain, buffer)
        atomic_write_bytes(path, buffer.getvalue())

    def load_checkpoint(self, path: str | os.PathLike, map_location: Any | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        if weights_only is False:
            log.warning("weights_only=False requested for %s; xscale loads checkpoints with weights_only=True.", path)
        return load_lightning_checkpoint(path, map_location="cpu" if map_location is None else map_location)

    def remove_checkpoint(self, path: str | os.PathLike) -> None:
        Path(path).unlink(missing_ok=True)


class ResumableCheckpoint(Callback):
    """Write ``<dirpath>/last.ckpt`` every ``every_n_train_steps`` steps, after each epoch's last batch, and at the end.

    The epoch's checkpoint is taken in ``on_train_batch_end`` of its last batch, not in
    ``on_train_epoch_end``: Lightning 2.6 restores a checkpoint taken in
    ``on_train_epoch_end`` of a run with ``max_steps`` set as one epoch further on, so a
    resumed run with an epoch budget would train one epoch less (tested in
    ``tests/reliability/test_reliability_resume.py::test_epoch_budget_survives_a_crash``).

    Parameters
    ----------
    dirpath
        Checkpoint directory.
    every_n_train_steps
        Save period in optimiser steps (>= 1).
    """

    def __init__(self, dirpath: str | os.PathLike, every_n_train_steps: int = 50) -> None:
        if every_n_train_steps < 1:
            raise ValueError(f"every_n_train_steps must be >= 1, got {every_n_train_steps}.")
        self.dirpath = Path(dirpath)
        self.every_n_train_steps = int(every_n_train_steps)
        self._last_saved_step: int | None = None

    @property
    def last_path(self) -> Path:
        return self.dirpath / LAST

    def _save(self, trainer: lightning.Trainer) -> None:
        if trainer.sanity_checking or bool(trainer.fast_dev_run):
            return
        if self._last_saved_step == trainer.global_step or trainer.global_step == 0:
            return
        # weights_only=False here means "save the full training state" (optimiser, loops), not the
        # load-side flag; the write goes through strategy.checkpoint_io (SafeCheckpointIO).
        trainer.save_checkpoint(self.last_path, weights_only=False)
        self._last_saved_step = trainer.global_step
        log.debug("Saved %s at global step %d", self.last_path, trainer.global_step)

    def on_train_start(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        self._last_saved_step = trainer.global_step  # nothing new to save before the next step
        # Lightning applies the loaders' saved states when it sets up the data after restoring a checkpoint; a
        # module that asks for trainer.estimated_stepping_batches with an epoch budget (level 1's warm-up) makes
        # it set up the data before the restore, and the states would never be applied: apply them now.
        load_states = getattr(trainer.fit_loop, "_load_combined_loader_states", None)
        if callable(load_states):
            load_states()
        epoch_loop = trainer.fit_loop.epoch_loop
        for loader in flat_loaders(trainer.train_dataloader):
            # ResumableLoader, EpochLoader: batches of the epoch trained on, prefetched ones not counted
            if callable(getattr(loader, "bind_progress", None)):
                loader.bind_progress(lambda: (epoch_loop.batch_progress.current.ready, trainer.num_training_batches))

    def on_train_batch_end(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        last_batch = bool(getattr(trainer.fit_loop.epoch_loop.batch_progress, "is_last_batch", False))
        if trainer.global_step % self.every_n_train_steps == 0 or last_batch:
            self._save(trainer)

    def on_train_end(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        self._save(trainer)


def _check_resumable(ckpt: dict[str, Any], module: torch.nn.Module, path: Path) -> None:
    """The checkpoint must hold this module's parameters (same names and shapes)."""
    saved = ckpt["state_dict"]
    current = module.state_dict()
    missing = sorted(set(current) - set(saved))
    unexpected = sorted(set(saved) - set(current))
    wrong = sorted(k for k in set(saved) & set(current)
                   if tuple(getattr(saved[k], "shape", ())) != tuple(current[k].shape))
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{path} was written by a different model: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"shape mismatch {wrong[:5]}. Use a new checkpoint directory for a new configuration, or delete "
            f"{path} to start over."
        )


def fit_resumable(
    module: lightning.LightningModule,
    *,
    datamodule: lightning.LightningDataModule | None = None,
    train_dataloaders: Any = None,
    val_dataloaders: Any = None,
    ckpt_dir: str | os.PathLike,
    trainer_kwargs: dict[str, Any],
    every_n_train_steps: int = 50,
) -> lightning.Trainer:
    """Fit ``module``, checkpointing to ``ckpt_dir`` and resuming from it when re-run.

    Parameters
    ----------
    module
        The LightningModule to train (built the same way on every run).
    datamodule, train_dataloaders, val_dataloaders
        As for ``lightning.Trainer.fit`` (a datamodule or dataloaders, not both).
    ckpt_dir
        Directory for ``last.ckpt``. If it already holds ``last.ckpt`` (an interrupted or
        finished run), training resumes from it: global step, epoch, optimiser and
        scheduler states, callback states. A finished run returns without more steps.
    trainer_kwargs
        Keyword arguments for ``lightning.Trainer`` (``max_epochs``, ``max_steps``,
        ``accelerator``, ``logger``, ``callbacks``, ``plugins``, ...). Its ``callbacks``
        get a :class:`ResumableCheckpoint`; its ``plugins`` get a
        :class:`SafeCheckpointIO` (another ``CheckpointIO`` is refused, because it would
        bypass atomic writes and ``weights_only`` reads). ``default_root_dir`` defaults
        to ``ckpt_dir``.
    every_n_train_steps
        Checkpoint period in optimiser steps.

    Returns
    -------
    The ``lightning.Trainer`` after ``fit`` (``trainer.global_step``,
    ``trainer.callback_metrics``, ...).

    Raises
    ------
    CheckpointError
        ``last.ckpt`` is unreadable, unsafe (needs pickle of arbitrary objects) or belongs
        to a different model.
    """
    import lightning

    from xscale.train.quiet import quiet_fit

    if datamodule is not None and (train_dataloaders is not None or val_dataloaders is not None):
        raise ValueError("Pass either datamodule or train/val dataloaders to fit_resumable, not both.")
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    last = ckpt_dir / LAST
    remove_stale_temps(last)

    kwargs = dict(trainer_kwargs)
    callbacks = kwargs.get("callbacks") or []
    callbacks = list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
    kwargs["callbacks"] = [*callbacks, ResumableCheckpoint(ckpt_dir, every_n_train_steps)]
    plugins = kwargs.get("plugins") or []
    plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    foreign = [p for p in plugins if isinstance(p, CheckpointIO) and not isinstance(p, SafeCheckpointIO)]
    if foreign:
        raise ValueError(f"fit_resumable installs its own SafeCheckpointIO; remove {foreign} from plugins.")
    if not any(isinstance(p, SafeCheckpointIO) for p in plugins):
        plugins.append(SafeCheckpointIO())
    kwargs["plugins"] = plugins
    kwargs.setdefault("default_root_dir", str(ckpt_dir))
    if kwargs.get("enable_checkpointing") is None:
        from lightning.pytorch.callbacks import ModelCheckpoint

        # Lightning's default ModelCheckpoint would be a second writer; keep one only if asked for.
        kwargs["enable_checkpointing"] = any(isinstance(c, ModelCheckpoint) for c in callbacks)

    ckpt_path: str | None = None
    if last.exists():
        ckpt = load_lightning_checkpoint(last)  # refuse unsafe/corrupted files before fitting
        _check_resumable(ckpt, module, last)
        log.info("Resuming from %s (global step %d, epoch %d)", last, ckpt["global_step"], ckpt["epoch"])
        ckpt_path = str(last)
        del ckpt

    with quiet_fit():
        trainer = lightning.Trainer(**kwargs)
        trainer.fit(module, train_dataloaders=train_dataloaders, val_dataloaders=val_dataloaders,
                    datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    return trainer


def last_checkpoint(ckpt_dir: str | os.PathLike) -> Path | None:
    """``<ckpt_dir>/last.ckpt`` if it exists, else None."""
    path = Path(ckpt_dir) / LAST
    return path if path.is_file() else None


def checkpoint_state_dict(path: str | os.PathLike, *, prefix: str = "",
                          map_location: Any = "cpu") -> dict[str, torch.Tensor]:
    """The module weights stored in a Lightning checkpoint, read safely.

    Parameters
    ----------
    path
        A ``.ckpt`` file (e.g. ``<ckpt_dir>/last.ckpt``).
    prefix
        Keep only keys starting with ``prefix`` and strip it (e.g. ``"model."`` to get the
        inner ``nn.Module``'s state dict from a LightningModule's).
    """
    state = load_lightning_checkpoint(path, map_location=map_location)["state_dict"]
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


__all__: list[str] = [
    "LAST", "RNG_KEY", "ResumableBatchSampler", "ResumableCheckpoint", "ResumableLoader", "SafeCheckpointIO",
    "apply_generator_state", "checkpoint_state_dict", "fit_resumable", "last_checkpoint", "load_lightning_checkpoint",
    "restore_rng_state", "rng_state", "to_plain",
]
