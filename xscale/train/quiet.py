"""Lightning's console notes that tell an xscale user nothing, left out around a fit.

Every xscale fit (levels 1 and 2, joint, fine-tuning, ``xscale fit``) printed, besides its
own progress:

- an advertisement for Lightning's cloud logger (``💡 Tip: ... litlogger``, an INFO record);
- ``isinstance(treespec, LeafSpec) is deprecated``: Lightning's own pytree helper calling a
  torch API that torch 2.13 deprecates, nothing the user can change;
- ``You have overridden transfer_batch_to_device in LightningModule but have passed in a
  LightningDataModule``: the xscale modules define that hook on purpose (their batches are
  dataclasses that move themselves), and Lightning says it will use it, as intended;
- ``Your IterableDataset has __len__ defined ... could be inaccurate if each worker is not
  configured independently``: said of every sized stream; xscale's streams (``CellStream``,
  ``NicheStream``) shard their blocks over DataLoader workers and ranks so that each item is
  read exactly once per epoch (tested), and their length counts the items of all shards together.

:func:`quiet_fit` drops exactly these, for the duration of the fit; every other warning and
record passes. :func:`log_interval` is Trainer's ``log_every_n_steps`` capped at the epoch's
batch count, so short epochs still log and Lightning does not warn that they would not.
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

NOISE_WARNINGS = (
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    r"You have overridden `transfer_batch_to_device` in `LightningModule` but have passed in a `LightningDataModule`",
    r"Your `IterableDataset` has `__len__` defined",
)
TIP_PREFIX = "💡 Tip"


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(TIP_PREFIX)


RANK_ZERO_LOGGERS = (
    "lightning_utilities.core.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "lightning.pytorch.utilities.rank_zero",
)


def _rank_zero_loggers() -> list[logging.Logger]:
    """The loggers Lightning's ``rank_zero_info`` may write to.

    ``lightning_utilities`` writes to its module's ``log``, which each Lightning package
    replaces with its own logger when it is imported; a fit that imports
    ``lightning.pytorch`` inside :func:`quiet_fit` (as ``xscale fit`` does) switches it
    after the filter is in place, so every candidate gets the filter.
    """
    return [logging.getLogger(name) for name in RANK_ZERO_LOGGERS]


@contextlib.contextmanager
def quiet_fit() -> Iterator[None]:
    """Inside: Lightning's advertisement record and the warnings in :data:`NOISE_WARNINGS` are dropped."""
    drop = _DropTips()
    loggers = _rank_zero_loggers()
    with warnings.catch_warnings():
        for message in NOISE_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        for logger in loggers:
            logger.addFilter(drop)
        try:
            yield
        finally:
            for logger in loggers:
                logger.removeFilter(drop)


def log_interval(n_batches: int, default: int = 50) -> int:
    """``log_every_n_steps`` for epochs of ``n_batches``: ``default``, at most one epoch, at least 1."""
    return max(1, min(default, int(n_batches)))


def loop_defaults(datamodule: object, default_interval: int = 50) -> dict[str, int]:
    """Trainer arguments that fit ``datamodule``'s epochs: ``log_every_n_steps`` within one epoch
    (:func:`log_interval`), and ``limit_val_batches=0`` when it has no validation data (its
    ``val_dataloader()`` is empty), so the validation loop is skipped instead of run over nothing
    (Lightning warned "Total length of `list` across ranks is zero")."""
    out: dict[str, int] = {}
    try:
        out["log_every_n_steps"] = log_interval(len(datamodule.train_dataloader()), default_interval)
    except TypeError:  # a loader without a length (an unsized stream)
        out["log_every_n_steps"] = default_interval
    val = datamodule.val_dataloader()
    if isinstance(val, (list, tuple)) and len(val) == 0:
        out["limit_val_batches"] = 0
    return out
