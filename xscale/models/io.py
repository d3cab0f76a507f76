"""Saving and loading models without pickle: safetensors weights + a JSON config.

A saved model is a directory::

    model.safetensors   tensors only (cannot run code when read)
    config.json         {"format_version": 1, "model": "<registered name>", "config": {...}}

Models register a name, their class and their typed config dataclass with
:func:`register_model`; the class must accept ``cls(config)`` and expose ``.config``.
Old formats go through :func:`upgrade_checkpoint_config`; unknown versions are a
clear error.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from xscale.errors import CheckpointError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"

_REGISTRY: dict[str, tuple[type[nn.Module], type]] = {}
# Upgrade steps: version v -> function taking the v document and returning the v+1 document.
_UPGRADES: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {}


def register_model(name: str, config_cls: type) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: make ``cls`` loadable by :func:`load_model` under ``name``."""

    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        _REGISTRY[name] = (cls, config_cls)
        cls._xscale_name = name  # type: ignore[attr-defined]
        return cls

    return wrap


def registered_models() -> list[str]:
    return sorted(_REGISTRY)


def config_to_dict(config: Any) -> dict[str, Any]:
    """A config dataclass as plain JSON-able data (nested dataclasses and tuples included)."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=list))


def config_from_dict(config_cls: type, data: dict[str, Any]) -> Any:
    """Rebuild a (possibly nested) config dataclass; unknown keys are an error, not ignored."""
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise CheckpointError(
            f"Checkpoint config for {config_cls.__name__} has unknown keys {unknown}; "
            f"expected a subset of {sorted(fields)}. Was it written by a newer xscale?"
        )
    kwargs = {}
    for key, value in data.items():
        ftype = fields[key].type
        sub = _dataclass_type(ftype)
        kwargs[key] = config_from_dict(sub, value) if sub is not None and isinstance(value, dict) else value
        if isinstance(value, list) and "tuple" in str(ftype):
            kwargs[key] = tuple(value)
    return config_cls(**kwargs)


def _dataclass_type(ftype: Any) -> type | None:
    import typing

    if isinstance(ftype, str):
        # Postponed annotations: resolve names of registered config classes.
        for _, cfg in _REGISTRY.values():
            for f in dataclasses.fields(cfg):
                t = f.type
                if dataclasses.is_dataclass(t) and getattr(t, "__name__", None) == ftype:
                    return t  # type: ignore[return-value]
        candidates = {c.__name__: c for _, c in _REGISTRY.values()}
        return candidates.get(ftype.split("|")[0].strip())
    if dataclasses.is_dataclass(ftype):
        return ftype  # type: ignore[return-value]
    for arg in typing.get_args(ftype):
        if dataclasses.is_dataclass(arg):
            return arg  # type: ignore[return-value]
    return None


def save_model(model: nn.Module, directory: str | os.PathLike, *, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` to ``directory`` (weights + config), atomically.

    The files are written to ``<directory>.tmp`` and renamed into place when both are
    complete, so an interrupted save never leaves a directory that looks finished.
    """
    from safetensors.torch import save_file

    name = getattr(type(model), "_xscale_name", None)
    if name is None:
        raise TypeError(f"{type(model).__name__} is not registered; decorate it with @register_model(...).")
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / WEIGHTS))
    doc = {
        "format_version": FORMAT_VERSION,
        "model": name,
        "config": config_to_dict(model.config),
        "extra": extra or {},
    }
    (tmp / CONFIG).write_text(json.dumps(doc, indent=2))
    if directory.exists():
        shutil.rmtree(directory)
    tmp.rename(directory)
    return directory


def read_checkpoint_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's JSON document, upgraded to the current format version."""
    directory = Path(directory)
    cfg_path = directory / CONFIG
    if directory.is_file():
        raise CheckpointError(
            f"{directory} is a file; an xscale model is a directory with {WEIGHTS} and {CONFIG}. "
            "Pickled checkpoints (.ckpt/.pt) are not loaded as models because unpickling can run code; "
            "export one with xscale.models.io.save_model()."
        )
    if not cfg_path.exists():
        raise CheckpointError(f"No {CONFIG} in {directory}: not an xscale model directory.")
    try:
        doc = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{cfg_path} is not valid JSON ({err}); the checkpoint is corrupted.") from err
    return upgrade_checkpoint_config(doc)


def upgrade_checkpoint_config(doc: dict[str, Any]) -> dict[str, Any]:
    """Bring a checkpoint document from its ``format_version`` up to :data:`FORMAT_VERSION`."""
    version = doc.get("format_version")
    if not isinstance(version, int):
        raise CheckpointError(f"Checkpoint config has no integer 'format_version' (found {version!r}).")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"Checkpoint format_version {version} is newer than this xscale supports ({FORMAT_VERSION}); "
            "upgrade xscale."
        )
    while version < FORMAT_VERSION:
        if version not in _UPGRADES:
            raise CheckpointError(f"No upgrade path from checkpoint format_version {version}.")
        doc = _UPGRADES[version](doc)
        version = doc["format_version"]
        log.info("Upgraded checkpoint config to format_version %d", version)
    return doc


def load_model(directory: str | os.PathLike, *, map_location: str = "cpu") -> nn.Module:
    """Load a model saved by :func:`save_model`. Never unpickles anything."""
    from safetensors.torch import load_file

    directory = Path(directory)
    doc = read_checkpoint_config(directory)
    name = doc.get("model")
    if name not in _REGISTRY:
        _import_model_modules()
    if name not in _REGISTRY:
        raise CheckpointError(f"Checkpoint names model {name!r}; known models: {registered_models()}.")
    cls, config_cls = _REGISTRY[name]
    model = cls(config_from_dict(config_cls, doc["config"]))
    try:
        state = load_file(str(directory / WEIGHTS), device=map_location)
    except Exception as err:  # safetensors raises its own error types for truncated files
        raise CheckpointError(f"Cannot read {directory / WEIGHTS}: {err}. The file is missing or corrupted.") from err
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"Weights in {directory} do not match model {name!r}: missing {missing[:5]}, unexpected {unexpected[:5]}."
        )
    model.eval()
    return model


def _import_model_modules() -> None:
    """Import the modules that register models, so ``load_model`` works from a cold start."""
    import importlib

    for mod in ("xscale.models.gene_to_cell", "xscale.models.cell_to_tissue", "xscale.models.heads"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError:
            pass
