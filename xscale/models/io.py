"""Saving and loading models without pickle: safetensors weights + a JSON config.

A saved model is a directory::

    model.safetensors   tensors only (cannot run code when read)
    config.json         {"format_version": 1, "model": "<registered name>", "config": {...}, "extra": {...}}
    .xscale-complete    marker written last (see xscale.utils.atomic.is_complete)

Models register a name, their class and their typed config dataclass with
:func:`register_model`; the class must accept ``cls(config)`` and expose ``.config``.
Old formats go through :func:`upgrade_checkpoint_config`; unknown versions are a
clear error.

Format history
--------------
- **v0** (pre-release): ``config.json`` had no ``format_version`` key, named the model
  under ``"model_name"`` and had no ``"extra"`` dict::

      {"model_name": "<registered name>", "config": {...}}

- **v1** (current): ``{"format_version": 1, "model": ..., "config": {...}, "extra": {...}}``.

Each step ``v -> v+1`` is a pure function on the JSON document registered in
``_UPGRADES``; loading applies them in order. Nothing in this module unpickles: weights
are read with ``safetensors`` and the config is JSON.
"""
from __future__ import annotations

import contextvars
import dataclasses
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from xscale.errors import CheckpointError
from xscale.utils.atomic import atomic_dir

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"

_REGISTRY: dict[str, tuple[type[nn.Module], type]] = {}


def _upgrade_v0_to_v1(doc: dict[str, Any]) -> dict[str, Any]:
    """v0 -> v1: ``model_name`` becomes ``model``; add ``format_version`` and an empty ``extra``."""
    if "model_name" not in doc or "config" not in doc:
        raise CheckpointError(
            f"Checkpoint config of format v0 needs keys 'model_name' and 'config'; found {sorted(doc)}."
        )
    upgraded = {k: v for k, v in doc.items() if k not in ("model_name", "format_version")}
    upgraded.update(format_version=1, model=doc["model_name"], extra=doc.get("extra") or {})
    return upgraded


# Upgrade steps: version v -> function taking the v document and returning the v+1 document.
_UPGRADES: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {0: _upgrade_v0_to_v1}


def register_model(name: str, config_cls: type) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: make ``cls`` loadable by :func:`load_model` under ``name``."""

    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        _REGISTRY[name] = (cls, config_cls)
        cls._xscale_name = name  # type: ignore[attr-defined]
        return cls

    return wrap


def registered_models() -> list[str]:
    return sorted(_REGISTRY)


def check_finite_fields(config: Any) -> None:
    """Every float field of a config dataclass is finite (NaN weights trained NaN models or silently
    switched a term off; inf scales silently dropped a feature). Raises ValueError naming the field."""
    import math

    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{type(config).__name__}.{f.name} must be a finite number; got {value}.")


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
    try:
        return config_cls(**kwargs)
    except (TypeError, ValueError) as err:  # missing required fields, __post_init__ checks
        raise CheckpointError(f"Checkpoint config for {config_cls.__name__} is invalid: {err}") from err


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

    The files are written to ``<directory>.tmp-<pid>-<hex>`` and renamed into place when
    both are complete (:func:`xscale.utils.atomic.atomic_dir`), so an interrupted save
    never leaves a directory that looks finished; an existing ``directory`` is replaced.
    ``extra`` must be JSON-serialisable (it is stored in ``config.json``).
    """
    from safetensors.torch import save_file

    name = getattr(type(model), "_xscale_name", None)
    if name is None:
        raise TypeError(f"{type(model).__name__} is not registered; decorate it with @register_model(...).")
    doc = {
        "format_version": FORMAT_VERSION,
        "model": name,
        "config": config_to_dict(model.config),
        "extra": extra or {},
    }
    text = json.dumps(doc, indent=2)  # fail on non-JSON extras before touching the disk
    # Tied/shared parameters would make safetensors refuse; clone so every entry owns its storage.
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    directory = Path(directory)
    with atomic_dir(directory) as tmp:
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt", "xscale_model": name})
        (tmp / CONFIG).write_text(text)
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
    if not directory.exists():
        raise CheckpointError(f"Model directory {directory} does not exist.")
    if not cfg_path.exists():
        raise CheckpointError(
            f"No {CONFIG} in {directory}: not an xscale model directory (expected {WEIGHTS} and {CONFIG}; "
            f"found {sorted(p.name for p in directory.iterdir())[:10]})."
        )
    try:
        doc = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{cfg_path} is not valid JSON ({err}); the checkpoint is corrupted.") from err
    if not isinstance(doc, dict):
        raise CheckpointError(f"{cfg_path} must hold a JSON object, found {type(doc).__name__}.")
    return upgrade_checkpoint_config(doc)


def upgrade_checkpoint_config(doc: dict[str, Any]) -> dict[str, Any]:
    """Bring a checkpoint document from its ``format_version`` up to :data:`FORMAT_VERSION`."""
    if "format_version" not in doc and "model_name" in doc:
        version = 0  # v0 files carried no version key (see the module docstring)
        doc = {**doc, "format_version": 0}
    else:
        version = doc.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise CheckpointError(
            f"Checkpoint config has no valid 'format_version' (found {version!r}); expected an integer "
            f"0..{FORMAT_VERSION}. The file is not an xscale model config or is corrupted."
        )
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"Checkpoint format_version {version} is newer than this xscale supports ({FORMAT_VERSION}); "
            "upgrade xscale."
        )
    while version < FORMAT_VERSION:
        if version not in _UPGRADES:
            raise CheckpointError(f"No upgrade path from checkpoint format_version {version}.")
        doc = _UPGRADES[version](doc)
        if doc.get("format_version") != version + 1:
            raise AssertionError(f"upgrade step from v{version} did not produce v{version + 1}")
        version = doc["format_version"]
        log.info("Upgraded checkpoint config to format_version %d", version)
    return doc


_LOADING: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("xscale_loading", default=None)


def weights_being_loaded() -> dict[str, Any] | None:
    """While :func:`load_model` builds a model: the saved weights about to be loaded into it (for parts that
    would otherwise need an input file only to learn their shapes, e.g. a gene table that has moved); else None."""
    return _LOADING.get()


def load_model(directory: str | os.PathLike, *, map_location: str = "cpu") -> nn.Module:
    """Load a model saved by :func:`save_model`. Never unpickles anything."""
    from safetensors.torch import load_file

    directory = Path(directory)
    doc = read_checkpoint_config(directory)
    name = doc.get("model")
    if not isinstance(name, str):
        raise CheckpointError(f"{directory / CONFIG} has no model name (key 'model'); found {name!r}.")
    if not isinstance(doc.get("config"), dict):
        raise CheckpointError(f"{directory / CONFIG} key 'config' must be an object; found {doc.get('config')!r}.")
    if name not in _REGISTRY:
        _import_model_modules()
    if name not in _REGISTRY:
        raise CheckpointError(f"Checkpoint names model {name!r}; known models: {registered_models()}.")
    cls, config_cls = _REGISTRY[name]
    weights = directory / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{weights} is missing; the model directory is incomplete.")
    try:
        # safetensors parses a JSON header and raw tensor bytes: no code can run. A pickle
        # renamed to model.safetensors fails here with a header error.
        state = load_file(str(weights), device=map_location)
    except Exception as err:  # safetensors raises its own error types for truncated files
        raise CheckpointError(
            f"Cannot read {weights}: {err}. The file is not a valid safetensors file (missing, truncated, "
            "corrupted, or a pickle under the wrong name); xscale never unpickles model files."
        ) from err
    token = _LOADING.set(state)
    try:
        model = cls(config_from_dict(config_cls, doc["config"]))
    finally:
        _LOADING.reset(token)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise CheckpointError(f"Weights in {directory} do not fit model {name!r}: {err}") from err
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
