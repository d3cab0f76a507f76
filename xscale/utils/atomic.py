"""Write-to-temp-then-rename helpers, so a half-written output never looks finished.

Three primitives:

- :func:`atomic_dir` — build a directory (a zarr store, a saved model, a results folder)
  under a temporary sibling name ``<name>.tmp-<pid>-<hex>``; on success a completion
  marker is written and the directory is renamed into place; on any exception the
  temporary directory is removed. :func:`is_complete` tells a finished directory from
  anything else.
- :func:`atomic_write` / :func:`atomic_write_bytes` / :func:`atomic_write_text` — the
  same for one file (flushed and fsync'ed before ``os.replace``).
- :func:`replace_dir` — the final step of :func:`atomic_dir` on its own, for writers that
  build their temporary directory themselves: the old target is moved aside, not deleted,
  until the new one is in place.

Both replace only what xscale could have written there (:func:`check_replaceable`): nothing, an
empty directory, a directory with the completion marker, or a zarr store. A file, or a directory
of anything else (``--out .`` by mistake), is refused before any work and again before the swap.

Temporaries live beside their target (same file system), so the final rename is a
single atomic ``rename(2)``. Temporaries left by a killed process (SIGKILL, power loss)
are recognised by the dead process id in their name and removed by
:func:`remove_stale_temps`, which :func:`atomic_dir` calls before it starts.

Example
-------
>>> with atomic_dir("out/latents.zarr") as tmp:      # doctest: +SKIP
...     write_store(tmp)                               # writes into out/latents.zarr.tmp-123-ab12
>>> is_complete("out/latents.zarr")                    # doctest: +SKIP
True
"""
from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Literal

log = logging.getLogger(__name__)

#: Name of the empty marker file written into a directory once it is complete.
COMPLETE_MARKER = ".xscale-complete"
_TMP_TAG = ".tmp-"


def temp_path(path: str | os.PathLike) -> Path:
    """A fresh temporary sibling of ``path`` (``<name>.tmp-<pid>-<hex>``), the form
    :func:`remove_stale_temps` recognises once its process is gone."""
    path = Path(path)
    return path.with_name(f"{path.name}{_TMP_TAG}{os.getpid()}-{secrets.token_hex(4)}")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _fsync_dir(directory: Path) -> None:
    """Persist a rename: fsync the parent directory (no-op where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Remove temporaries of ``path`` left behind by processes that no longer run.

    Parameters
    ----------
    path
        The final path whose ``<name>.tmp-<pid>-<hex>`` siblings are inspected.

    Returns
    -------
    The temporaries removed. Those of live processes (a concurrent writer) are kept.
    """
    path = Path(path)
    removed: list[Path] = []
    if not path.parent.is_dir():
        return removed
    prefix = f"{path.name}{_TMP_TAG}"
    for sibling in path.parent.iterdir():
        if not sibling.name.startswith(prefix):
            continue
        pid_text = sibling.name[len(prefix):].split("-", 1)[0]
        if not pid_text.isdigit() or _pid_alive(int(pid_text)):
            continue
        log.info("Removing stale temporary %s left by an interrupted run", sibling)
        _remove(sibling)
        removed.append(sibling)
    return removed


def is_complete(path: str | os.PathLike) -> bool:
    """True when ``path`` is a directory finished by :func:`atomic_dir` (marker present)."""
    path = Path(path)
    return path.is_dir() and (path / COMPLETE_MARKER).is_file()


def mark_complete(path: str | os.PathLike) -> None:
    """Write the completion marker into ``path`` (for directories built in place)."""
    marker = Path(path) / COMPLETE_MARKER
    marker.write_text("complete\n")


def make_output_dir(path: str | os.PathLike) -> Path:
    """Create the output directory ``path`` (and parents) if needed; a file there is a clear
    :class:`~xscale.errors.XscaleInputError`, not a traceback. Returns the path."""
    from xscale.errors import XscaleInputError

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise XscaleInputError(f"{path}: expected an output directory, found a file. Pass another path.")
    if any((path / name).is_file() for name in _ZARR_FILES):  # e.g. the user's own AnnData or SpatialData store
        raise XscaleInputError(f"{path}: expected an output directory (xscale writes its files and stores inside "
                               "it), found a zarr store. Pass a new directory, e.g. one beside the store.")
    path.mkdir(parents=True, exist_ok=True)
    return path


#: Files whose presence marks a zarr store (v3, v2 group, v2 array).
_ZARR_FILES = ("zarr.json", ".zgroup", ".zarray")
#: Root attribute that marks a zarr store as written by xscale (AnnData zarr outputs); prepared
#: stores carry ``xscale_store``.
XSCALE_ZARR_ATTR = "xscale_output"


def _zarr_root_attrs(path: Path) -> dict:
    """Root attributes of a zarr store, read from its metadata file (v3 zarr.json, v2 .zattrs)."""
    import json

    try:
        if (path / "zarr.json").is_file():
            return dict(json.loads((path / "zarr.json").read_text()).get("attributes") or {})
        if (path / ".zattrs").is_file():
            return dict(json.loads((path / ".zattrs").read_text()))
    except (OSError, ValueError, AttributeError):
        pass
    return {}


def is_xscale_zarr(path: str | os.PathLike) -> bool:
    """True for a zarr store xscale wrote: a prepared store, an AnnData zarr output (root
    attribute :data:`XSCALE_ZARR_ATTR`), or one written before that attribute existed (its
    ``uns/xscale`` group, as ``xscale run`` / ``embed`` / ``demo`` record)."""
    path = Path(path)
    attrs = _zarr_root_attrs(path)
    return XSCALE_ZARR_ATTR in attrs or "xscale_store" in attrs or (path / "uns" / "xscale").is_dir()


def check_replaceable(path: str | os.PathLike) -> None:
    """Raise :class:`~xscale.errors.XscaleInputError` unless ``path`` may be replaced by an xscale output.

    Replaceable: a path that does not exist, an empty directory, a directory holding the
    completion marker (an earlier xscale output), a saved model or a zarr store xscale wrote
    (:func:`is_xscale_zarr`). Anything else, a file, another zarr store or a directory of other
    things, may be the user's own work and is never moved or deleted.
    """
    from xscale.errors import XscaleInputError

    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        return
    if path.is_symlink() or not path.is_dir():
        raise XscaleInputError(f"{path}: expected a new or earlier xscale output directory, found a file. "
                               "Pass another path; xscale does not replace it.")
    entries = sorted(p.name for p in path.iterdir())
    if not entries or COMPLETE_MARKER in entries:
        return
    if any(name in entries for name in _ZARR_FILES):
        if is_xscale_zarr(path):
            return
        raise XscaleInputError(
            f"{path}: expected a new path or a zarr store xscale wrote, found a zarr store it did not write (your "
            "data?). xscale replaces its output as a whole, so it would delete it: pass a new path instead."
        )
    if {"config.json", "model.safetensors"} <= set(entries):  # a saved model copied without its marker
        return
    shown = ", ".join(entries[:5]) + (f", ... ({len(entries)} entries)" if len(entries) > 5 else "")
    raise XscaleInputError(
        f"{path}: expected a new, empty or earlier xscale output directory, found one that holds other "
        f"things ({shown}). xscale replaces its output directory as a whole, so it would delete them: "
        "pass a new path (e.g. a subdirectory) instead."
    )


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, overwrite: bool = True, marker: bool = True) -> Iterator[Path]:
    """Build a directory under a temporary name; rename it to ``path`` on success.

    Parameters
    ----------
    path
        Final directory. Its parent is created if needed.
    overwrite
        If True (default) an existing ``path`` is replaced once the new one is complete;
        if False an existing ``path`` raises :class:`FileExistsError` before any work.
    marker
        Write :data:`COMPLETE_MARKER` inside before the rename (default). Pass False for a zarr
        store: zarr warns about any file in a store that is not part of its hierarchy.

    Yields
    ------
    The temporary directory (``<path>.tmp-<pid>-<hex>``, same parent) to write into.

    Raises
    ------
    XscaleInputError
        Before any work, when ``path`` holds something that is not an xscale output
        (:func:`check_replaceable`).

    Notes
    -----
    On success the marker :data:`COMPLETE_MARKER` is written inside (unless ``marker=False``), then the directory
    is renamed into place (an existing target is first moved aside and deleted after the
    rename, so readers see either the old or the new complete directory, but for the moment
    between the two renames). On an exception
    (including ``KeyboardInterrupt``) the temporary directory is removed and the exception
    propagates; ``path`` is left untouched.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True or choose another path.")
    check_replaceable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = temp_path(path)
    tmp.mkdir()
    try:
        yield tmp
        if marker:
            mark_complete(tmp)
    except BaseException:
        _remove(tmp)
        raise
    replace_dir(tmp, path)


def replace_dir(src: str | os.PathLike, dst: str | os.PathLike, *, check: bool = True) -> Path:
    """Move the finished directory ``src`` to ``dst``, replacing what is there without a gap.

    An existing ``dst`` is first moved aside (``<name>.tmp-<pid>-old<hex>``), then ``src`` is
    renamed into place, then the old one is deleted: a reader sees the old or the new complete
    directory, except between the two renames (no copying or deleting happens there), when
    ``dst`` is briefly absent. If the rename fails, the old directory is moved back before the error
    propagates, so a failed replacement loses nothing already written. ``src`` and ``dst`` must
    be on one file system (temporaries live beside their target). Returns ``dst``.
    ``dst`` must be replaceable (:func:`check_replaceable`); if not, nothing moves. ``check=False``
    skips that test, for an element inside a store the caller was asked to update (a SpatialData
    table written back, a column or latent array of a prepared store replaced on request).
    """
    src, dst = Path(src), Path(dst)
    if check:
        check_replaceable(dst)
    old: Path | None = None
    if dst.exists() or dst.is_symlink():
        old = dst.with_name(f"{dst.name}{_TMP_TAG}{os.getpid()}-old{secrets.token_hex(4)}")
        os.replace(dst, old)
    try:
        os.replace(src, dst)
    except BaseException:
        if old is not None:
            os.replace(old, dst)
        raise
    _fsync_dir(dst.parent)
    if old is not None:
        _remove(old)
    return dst


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: Literal["w", "wb"] = "wb") -> Iterator[IO]:
    """Open a temporary sibling of ``path`` for writing; ``os.replace`` it on success.

    The file is flushed and fsync'ed before the rename, so after a crash ``path`` holds
    either its previous content or the complete new content, never a prefix.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    with atomic_write(path, "wb") as handle:
        handle.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write_bytes(path, text.encode("utf-8"))
