"""Random state and data-loader position that survive a checkpoint, for bit-identical resumes.

A LightningModule stores its generators in ``checkpoint[RNG_KEY]`` with :func:`rng_state` and
restores them with :func:`restore_rng_state` / :func:`apply_generator_state` (xscale's level-1,
level-2 and joint modules do). A :class:`ResumableLoader` saves, in Lightning's loop state, its
shuffle generator at the start of the epoch, how many of the epoch's batches were trained on and
the collate function's numpy generator, and on resume skips the batches already used
(:class:`~xscale.train.checkpointing.ResumableCheckpoint` tells it Lightning's batch count).
Checkpoints written before these states were saved still load; the resumed run then logs that it
will not be bit-identical.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler

log = logging.getLogger(__name__)

RNG_KEY = "xscale_rng"
#: Batches of an epoch whose collate-generator state is kept (the fetcher runs at most a few ahead).
_KEEP_MARKS = 16


def flat_loaders(loaders: Any) -> list[Any]:
    """The loaders of Lightning's ``trainer.train_dataloader`` (one, or nested in lists / dicts)."""
    if isinstance(loaders, dict):
        return [x for v in loaders.values() for x in flat_loaders(v)]
    if isinstance(loaders, (list, tuple)):
        return [x for v in loaders for x in flat_loaders(v)]
    return [] if loaders is None else [loaders]


def rng_state(generators: dict[str, torch.Generator | None] | None = None) -> dict[str, Any]:
    """The random state a LightningModule stores in its checkpoint (``checkpoint[RNG_KEY]``).

    The global torch generator, the CUDA ones when CUDA is in use, and the module's own
    ``generators`` (name -> generator or None) with their devices.
    """
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    state["generators"] = {name: {"device": str(g.device), "state": g.get_state()}
                           for name, g in (generators or {}).items() if g is not None}
    return state


def restore_rng_state(checkpoint: dict[str, Any], what: str) -> dict[str, dict[str, Any]]:
    """Restore the global generators saved by :func:`rng_state` in ``checkpoint``.

    Returns the module's own generator states (name -> ``{"device", "state"}``) for it to
    apply when it creates them. A checkpoint without them (written by an older xscale) is
    resumed with today's fresh generators, and a warning says the run will not be
    bit-identical to an uninterrupted one.
    """
    state = checkpoint.get(RNG_KEY)
    if not isinstance(state, dict):
        log.warning("The %s checkpoint holds no random-generator states (written by an older xscale): training "
                    "resumes with fresh generators and data order, so the result will not be bit-identical to an "
                    "uninterrupted run.", what)
        return {}
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            log.warning("The %s checkpoint was written with %d CUDA device(s), %d are visible: the CUDA generators "
                        "start afresh, so the result will not be bit-identical.", what, len(cuda),
                        torch.cuda.device_count())
    return dict(state.get("generators") or {})


def apply_generator_state(generator: torch.Generator, saved: dict[str, Any] | None, what: str) -> None:
    """Set ``generator`` to a state returned by :func:`restore_rng_state` (same device only)."""
    if saved is None:
        return
    if saved.get("device") != str(generator.device):
        log.warning("The %s generator was saved on %s and now runs on %s: it starts afresh, so the resumed run will "
                    "not be bit-identical.", what, saved.get("device"), generator.device)
        return
    generator.set_state(saved["state"])


def _np_state(rng: Any) -> str:
    import json

    return json.dumps(rng.bit_generator.state, default=lambda a: a.tolist())


def _set_np_state(rng: Any, text: str) -> None:
    import json

    rng.bit_generator.state = json.loads(text)


class ResumableBatchSampler(BatchSampler):
    """A ``BatchSampler`` that can start an epoch after its first batches and remembers where it is.

    It yields exactly the batches of ``BatchSampler`` (the same random draws), minus the first
    ``skip`` ones of a resumed epoch (skipped as indices: nothing is read or collated). For
    :class:`ResumableLoader`, it records the shuffle generator's state when an epoch's
    iteration starts and, per batch, a snapshot from ``snapshot()`` taken before the batch is
    collated. A resume applies its state when the next epoch's iteration starts (after the
    loader's own draw at ``iter()``, which it replaces).
    """

    def __init__(self, sampler: Any, batch_size: int, drop_last: bool) -> None:
        super().__init__(sampler, batch_size, drop_last)
        self.snapshot: Any = None  # callable -> state before a batch is collated
        self.marks: dict[int, Any] = {}
        self.position = 0  # batches of this epoch handed out, skipped ones included
        self.exhausted = False
        self.start_state: torch.Tensor | None = None  # shuffle generator at the start of this epoch's draws
        self._resume: tuple[torch.Tensor | None, int | None, Any] | None = None  # (state, skip or None, base draw)

    def _generator(self) -> torch.Generator | None:
        return getattr(self.sampler, "generator", None)

    def __iter__(self) -> Any:
        resume, self._resume = self._resume, None
        gen, skip = self._generator(), 0
        if resume is not None:
            saved, consumed, base_draw = resume
            if gen is not None and saved is not None:
                gen.set_state(saved)
            if consumed is None:  # the epoch was over: ``saved`` is the state after it, before the next iter()
                if gen is not None and base_draw is not None:
                    base_draw()
            else:  # mid-epoch: ``saved`` is the state at this epoch's start; skip what was trained on
                skip = consumed
        self.start_state = gen.get_state() if gen is not None else None
        self.position, self.exhausted, self.marks = skip, False, {}
        for i, batch in enumerate(super().__iter__()):
            if i < skip:
                continue
            if self.snapshot is not None:
                self.marks[i] = self.snapshot()
                self.marks.pop(i - _KEEP_MARKS, None)
            self.position = i + 1
            yield batch
        self.exhausted = True


class ResumableLoader(DataLoader):
    """A map-style ``DataLoader`` whose position in the epoch survives a checkpoint.

    Batches, their order and every random draw are those of ``DataLoader(dataset,
    batch_size, shuffle, generator=generator, drop_last=drop_last, ...)``. Lightning saves
    :meth:`state_dict` in the checkpoint's loop state and, on resume, calls
    :meth:`load_state_dict` before iterating: the resumed epoch draws the same permutation and
    skips the batches already trained on, and ``rng_owner.rng`` (the numpy generator of the
    collate function, e.g. :class:`~xscale.train.level1.CollateCells`) continues from where it
    was. Exact with ``num_workers=0``; with workers the order is restored but not the workers'
    own generators.

    Parameters
    ----------
    dataset, batch_size, shuffle, sampler, batch_sampler, generator, drop_last, **kwargs
        As for ``DataLoader`` (``sampler``/``batch_sampler`` let Lightning inject
        distributed samplers).
    rng_owner
        An object whose ``rng`` attribute is the numpy generator the collate function draws
        from, or None.
    """

    def __init__(self, dataset: Any, batch_size: int | None = 1, shuffle: bool | None = None, sampler: Any = None,
                 batch_sampler: Any = None, *, generator: torch.Generator | None = None, drop_last: bool = False,
                 rng_owner: Any = None, **kwargs: Any) -> None:
        if batch_sampler is None and batch_size is not None:
            if sampler is None:
                sampler = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
            batch_sampler = ResumableBatchSampler(sampler, batch_size, drop_last)
            super().__init__(dataset, batch_sampler=batch_sampler, generator=generator, **kwargs)
        else:
            super().__init__(dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler,
                             batch_sampler=batch_sampler, generator=generator, drop_last=drop_last, **kwargs)
        self.rng_owner = rng_owner
        self._progress: Any = None
        if isinstance(self.batch_sampler, ResumableBatchSampler) and rng_owner is not None and self.num_workers == 0:
            self.batch_sampler.snapshot = self._rng_snapshot

    def _rng(self) -> Any:
        return getattr(self.rng_owner, "rng", None) if self.rng_owner is not None else None

    def _rng_snapshot(self) -> str | None:
        rng = self._rng()
        return _np_state(rng) if rng is not None else None

    def bind_progress(self, progress: Any) -> None:
        """``progress()`` -> (batches of the current epoch training has taken, batches in the epoch), as
        Lightning counts them (it may stop an epoch before the sampler ends)."""
        self._progress = progress

    def _base_draw(self) -> Any:
        """The draw ``iter(DataLoader)`` makes from the loader's generator at an epoch's start (none for
        persistent workers after the first epoch)."""
        if self.persistent_workers and self.num_workers > 0:
            return None
        gen = self.generator
        return lambda: torch.empty((), dtype=torch.int64).random_(generator=gen)

    def state_dict(self) -> dict[str, Any]:
        bs = self.batch_sampler
        if not isinstance(bs, ResumableBatchSampler):
            return {"version": 1}
        if self._progress is not None:
            consumed, n_batches = (int(x) for x in self._progress())
        else:  # Lightning's fetcher runs one batch ahead until the epoch's end
            consumed, n_batches = (bs.position if bs.exhausted else max(bs.position - 1, 0)), len(bs)
        done = consumed >= n_batches
        rng = None if done else bs.marks.get(consumed)  # before the next batch was collated (prefetched)
        if rng is None and self.num_workers == 0:
            rng = self._rng_snapshot()
        state: dict[str, Any] = {"version": 1, "consumed": consumed, "epoch_done": done}
        gen = bs._generator()
        # mid-epoch: the state the epoch's draws started from; after an epoch: the state the next one starts with
        saved = (gen.get_state() if gen is not None else None) if done else bs.start_state
        if saved is not None:
            state["generator"] = saved
        if rng is not None:
            state["collate_rng"] = rng
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        bs = self.batch_sampler
        if not isinstance(bs, ResumableBatchSampler) or "consumed" not in state:
            log.warning("The checkpoint's data-loader state cannot be applied: the epoch restarts from its first "
                        "batch, so the resumed run will not be bit-identical.")
            return
        skip = None if state.get("epoch_done") else int(state["consumed"])
        bs._resume = (state.get("generator"), skip, self._base_draw())
        rng = self._rng()
        if rng is not None and state.get("collate_rng") is not None and self.num_workers == 0:
            _set_np_state(rng, state["collate_rng"])


__all__: list[str] = ["RNG_KEY", "ResumableBatchSampler", "ResumableLoader", "apply_generator_state", "flat_loaders",
                      "restore_rng_state", "rng_state"]
