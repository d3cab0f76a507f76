"""Declarative pipelines: a YAML list of steps, each recorded by a manifest and skipped when done.

A pipeline file (see ``pipelines/*.yaml``)::

    name: pretrain-multiscale
    steps:
      - name: level1                  # unique; names the manifest and the step's folder
        uses: fit_level1              # a registered step kind (see STEPS)
        with: {datasets: [starmap_mpfc, seqfish_embryo_wsir], preset: tiny, max_epochs: 1}
      - name: embed_starmap
        uses: embed_cells
        with: {checkpoint: ${level1.checkpoint}, data: starmap_mpfc}

``${out}`` is the pipeline's output directory, ``${STEP.KEY}`` an output of an earlier
step and ``${vars.NAME}`` a value from the file's ``vars:`` mapping (override with
``--var NAME=VALUE``); a value that is exactly one ``${vars.NAME}`` keeps its YAML type. Each step
writes into ``OUT/STEP/`` and, when it finishes, ``OUT/manifests/STEP.json``:
its kind, parameters (and their hash), the outputs it produced (paths and sizes), results
(e.g. metrics) and timing. A re-run skips a step whose manifest matches its parameters and
whose outputs are all still there with the recorded sizes; ``force=True`` re-runs everything.

Run one with ``python -m xscale.pipelines pipelines/evaluate.yaml --out DIR``. Step kinds live in
:mod:`xscale.pipelines.steps`, the evaluation they share in :mod:`xscale.pipelines.evaluate`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import time
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xscale.errors import XscaleInputError

log = logging.getLogger(__name__)

MANIFESTS = "manifests"
_REF = re.compile(r"\$\{([A-Za-z0-9_]+)(?:\.([A-Za-z0-9_]+))?\}")


@dataclass
class StepSpec:
    name: str
    uses: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class StepContext:
    """What a step function receives: its own folder and the pipeline's output folder."""

    name: str
    workdir: Path  # OUT/STEP, created before the call
    out: Path


StepFn = Callable[..., dict[str, Any]]  # fn(ctx, **params) -> {"outputs": {...}, "results": {...}}
STEPS: dict[str, StepFn] = {}


def register_step(kind: str) -> Callable[[StepFn], StepFn]:
    """Register a step kind ``fn(ctx, *, param=..., ...)`` (keyword-only, typed parameters).

    It returns ``{"outputs": {key: path}, "results": {...}}``.
    """

    def wrap(fn: StepFn) -> StepFn:
        STEPS[kind] = fn
        return fn

    return wrap


# ------------------------------------------------------------------------ spec
def load_pipeline(path: str | Path) -> tuple[str, list[StepSpec], dict[str, Any]]:
    """Read and check a pipeline YAML; returns (name, steps, vars)."""
    import yaml

    import xscale.pipelines.steps  # noqa: F401  (registers the step kinds)

    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise XscaleInputError(f"Could not read pipeline {str(path)!r}: {err}") from err
    if not isinstance(doc, dict) or not isinstance(doc.get("steps"), list) or not doc["steps"]:
        raise XscaleInputError(f"Pipeline {str(path)!r} needs a non-empty 'steps:' list; found {type(doc).__name__}.")
    unknown = sorted(set(doc) - {"name", "description", "vars", "steps"})
    if unknown:
        raise XscaleInputError(
            f"Pipeline {str(path)!r}: unknown top-level keys {unknown}; expected name, description, vars, steps."
        )
    steps: list[StepSpec] = []
    for i, s in enumerate(doc["steps"]):
        if not isinstance(s, dict) or set(s) - {"name", "uses", "with", "config"} or "name" not in s:
            raise XscaleInputError(
                f"Pipeline step {i} must be a mapping with name, uses (or config: an experiment YAML) and "
                f"optional with; found {s!r}."
            )
        uses, params = s.get("uses"), dict(s.get("with") or {})
        if "config" in s:  # an experiment config (configs/experiment/*.yaml); `with` overrides its values
            uses, base = load_experiment(_relative(path, s["config"]))
            params = {**base, **params}
        if uses not in STEPS:
            raise XscaleInputError(f"Pipeline step {s['name']!r} uses unknown kind {uses!r}. Known: {sorted(STEPS)}.")
        if any(t.name == s["name"] for t in steps):
            raise XscaleInputError(f"Pipeline step name {s['name']!r} appears twice; names must be unique.")
        steps.append(StepSpec(str(s["name"]), str(uses), params))
    return str(doc.get("name", path.stem)), steps, dict(doc.get("vars") or {})


def _relative(pipeline: Path, ref: str) -> Path:
    """A config path as given if it exists (relative to the working directory), else relative to the repo."""
    p = Path(ref)
    if p.exists() or p.is_absolute():
        return p
    for base in (pipeline.resolve().parent, pipeline.resolve().parent.parent):
        if (base / ref).exists():
            return base / ref
    return p


def load_experiment(path: str | Path) -> tuple[str, dict[str, Any]]:
    """Read an experiment config (``uses: KIND`` + ``with: {...}``) and check its parameters."""
    import yaml

    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise XscaleInputError(f"Could not read experiment config {str(path)!r}: {err}") from err
    if not isinstance(doc, dict) or "uses" not in doc or set(doc) - {"uses", "with", "description"}:
        raise XscaleInputError(f"Experiment config {str(path)!r} needs 'uses:' and 'with:' keys; found {doc!r:.200}.")
    params = dict(doc.get("with") or {})
    check_step(doc["uses"], params, str(path))
    return doc["uses"], params


def check_step(kind: str, params: dict[str, Any], where: str) -> None:
    """Fail early (before running anything) when ``params`` do not fit step ``kind``'s signature."""
    import inspect

    import xscale.pipelines.steps  # noqa: F401  (registers the step kinds)

    if kind not in STEPS:
        raise XscaleInputError(f"{where}: unknown step kind {kind!r}. Known: {sorted(STEPS)}.")
    sig = inspect.signature(STEPS[kind])
    try:
        sig.bind(None, **params)
    except TypeError as err:
        names = [n for n in sig.parameters if n != "ctx"]
        raise XscaleInputError(f"{where}: step {kind!r} parameters do not fit: {err}. Parameters: {names}.") from None
    hints = typing.get_type_hints(STEPS[kind])
    for key, value in params.items():
        if isinstance(value, str) and "${" in value:  # a reference to an earlier step: checked once resolved
            continue
        if key in hints and not _fits(value, hints[key]):
            raise XscaleInputError(f"{where}: parameter {key!r} of step {kind!r}: expected {_show(hints[key])}, "
                                   f"found {value!r}. Check the pipeline's with: block or the --var you passed.")


def _fits(value: Any, hint: Any) -> bool:
    """Whether ``value`` (as parsed from YAML / --var) fits a step parameter's annotation."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if origin in (list, tuple):
        return isinstance(value, (list, tuple)) and (not args or all(_fits(v, args[0]) for v in value))
    if origin is dict:
        return isinstance(value, dict)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _show(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def _resolve(value: Any, out: Path, done: dict[str, dict[str, Any]], step: str, variables: dict[str, Any]) -> Any:
    if isinstance(value, dict):
        return {k: _resolve(v, out, done, step, variables) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, out, done, step, variables) for v in value]
    if not isinstance(value, str):
        return value
    whole = _REF.fullmatch(value)
    if whole and whole.group(1) == "vars" and whole.group(2) in variables:
        return variables[whole.group(2)]

    def sub(m: re.Match) -> str:
        ref, key = m.group(1), m.group(2)
        if ref == "out" and key is None:
            return str(out)
        if ref == "vars":
            if key not in variables:
                raise XscaleInputError(f"Step {step!r} refers to {m.group(0)}; vars defines {sorted(variables)}.")
            return str(variables[key])
        if ref not in done:
            raise XscaleInputError(f"Step {step!r} refers to ${{{m.group(0)[2:-1]}}}, "
                                   f"but no earlier step is named {ref!r}.")
        produced = {**done[ref].get("outputs", {}), **done[ref].get("results", {})}
        if key not in produced:
            raise XscaleInputError(f"Step {step!r} refers to {m.group(0)}; step {ref!r} produced {sorted(produced)}.")
        return str(
            produced[key]["path"] if isinstance(produced[key], dict) and "path" in produced[key] else produced[key]
        )

    return _REF.sub(sub, value)


def _var_value(value: Any, variables: dict[str, Any]) -> Any:
    """``${vars.NAME}`` standing alone replaced by its value; anything else as it is."""
    whole = _REF.fullmatch(value) if isinstance(value, str) else None
    if whole and whole.group(1) == "vars" and whole.group(2) in variables:
        return variables[whole.group(2)]
    return value


# -------------------------------------------------------------------- manifests
def _hash(kind: str, params: dict[str, Any]) -> str:
    text = json.dumps({"uses": kind, "with": params}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _mtime(path: Path) -> int:
    if path.is_file():
        return path.stat().st_mtime_ns
    return max((p.stat().st_mtime_ns for p in path.rglob("*") if p.is_file()), default=path.stat().st_mtime_ns)


def input_files(params: dict[str, Any], out: Path, step: str) -> dict[str, dict[str, int]]:
    """Files and folders the parameters name (data, models, earlier steps' outputs): size and
    last modification, so a step re-runs when what it reads changed, not only its parameters.
    The pipeline's output folder and the step's own folder are not inputs."""
    own = {Path(out).resolve(), (Path(out) / step).resolve()}
    found: dict[str, dict[str, int]] = {}

    def visit(value: Any) -> None:
        if isinstance(value, dict):
            for v in value.values():
                visit(v)
        elif isinstance(value, list):
            for v in value:
                visit(v)
        elif isinstance(value, str) and value and Path(value).exists():
            p = Path(value).resolve()
            if p in own or (Path(out) / step).resolve() in p.parents:
                return
            found[str(p)] = {"bytes": _size(p), "mtime_ns": _mtime(p)}

    visit(params)
    return found


def manifest_path(out: Path, step: str) -> Path:
    return Path(out) / MANIFESTS / f"{step}.json"


def is_complete(out: Path, spec: StepSpec, params: dict[str, Any]) -> dict[str, Any] | None:
    """The step's manifest if it matches ``params`` and every output is there, intact; else None."""
    mp = manifest_path(out, spec.name)
    if not mp.exists():
        return None
    try:
        man = json.loads(mp.read_text())
    except json.JSONDecodeError:
        return None
    if man.get("params_hash") != _hash(spec.uses, params):
        log.info("step %s: parameters changed since the last run; re-running", spec.name)
        return None
    if "inputs" in man and man["inputs"] != input_files(params, out, spec.name):  # older manifests: no record
        changed = sorted(set(man["inputs"]) ^ set(input_files(params, out, spec.name))) or sorted(man["inputs"])
        log.info("step %s: an input changed since the last run (%s); re-running", spec.name, ", ".join(changed[:3]))
        return None
    for key, rec in man.get("outputs", {}).items():
        p = Path(rec["path"])
        if not p.exists() or _size(p) != rec["bytes"]:
            log.info("step %s: output %s (%s) missing or changed; re-running", spec.name, key, p)
            return None
    return man


def write_json(path: Path, doc: dict[str, Any]) -> None:
    from xscale.utils.atomic import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(doc, indent=1, default=str))


# ------------------------------------------------------------------------- run
def _refs(value: Any) -> set[str]:
    """Names of the steps ``value`` (a step's params) refers to (``${STEP.key}``)."""
    if isinstance(value, dict):
        return set().union(*(_refs(v) for v in value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*(_refs(v) for v in value)) if value else set()
    if not isinstance(value, str):
        return set()
    return {m.group(1) for m in _REF.finditer(value) if m.group(1) not in ("out", "vars")}


def _needed_by(steps: list[Any], only: list[str] | None) -> dict[str, set[str]]:
    """With ``only``: each step not chosen that a chosen step reads, directly or through other steps -> the
    chosen or needed steps that read it. Unknown names in ``only`` are an error."""
    if only is None:
        return {}
    names = [spec.name for spec in steps]
    unknown = sorted(set(only) - set(names))
    if unknown:
        raise XscaleInputError(f"--only: expected step names of this pipeline ({names}), found {unknown}.")
    needed: dict[str, set[str]] = {}
    wanted = set(only)
    for spec in reversed(steps):  # a step reads only earlier ones: one backward pass closes the set
        if spec.name in wanted:
            for ref in _refs(spec.params):
                if ref not in only:
                    needed.setdefault(ref, set()).add(spec.name)
                wanted.add(ref)
    return needed


def run_pipeline(
    pipeline: str | Path, out: str | Path, *, force: bool = False, only: list[str] | None = None,
    variables: dict[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """Run a pipeline's steps in order; returns each step's manifest (with ``skipped`` set).

    Parameters
    ----------
    pipeline
        Path of the YAML file.
    out
        Output directory (steps write under ``out/STEP``; manifests under ``out/manifests``).
    force
        Re-run steps even when complete.
    only
        Run only these step names (their inputs must come from earlier complete manifests).
    variables
        Values overriding the file's ``vars:`` (unknown names are an error).
    """
    name, steps, file_vars = load_pipeline(pipeline)
    extra = sorted(set(variables or {}) - set(file_vars))
    if extra:
        raise XscaleInputError(f"Unknown pipeline vars {extra}; {pipeline} defines {sorted(file_vars)}.")
    file_vars.update(variables or {})
    for spec in steps:  # before running anything: names and types, with the vars filled in
        check_step(spec.uses, {k: _var_value(v, file_vars) for k, v in spec.params.items()}, f"step {spec.name!r}")
    needed_by = _needed_by(steps, only)  # with --only: each other step a chosen step reads -> who reads it
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    done: dict[str, dict[str, Any]] = {}
    for spec in steps:
        if only is not None and spec.name not in only and spec.name not in needed_by:
            continue  # neither chosen nor read by a chosen step
        params = _resolve(spec.params, out, done, spec.name, file_vars)
        man = None if force else is_complete(out, spec, params)
        if only is not None and spec.name not in only:
            if man is None:
                man = is_complete(out, spec, params)
            if man is None:
                raise XscaleInputError(
                    f"Step {spec.name!r} is needed by {sorted(needed_by[spec.name])} (chosen with --only) but has "
                    f"not completed: run it first (add it to --only), or run the whole pipeline.")
        if man is not None:
            log.info("[%s] step %s (%s): complete, skipped", name, spec.name, spec.uses)
            done[spec.name] = {**man, "skipped": True}
            continue
        check_step(spec.uses, params, f"step {spec.name!r}")
        inputs = input_files(params, out, spec.name)  # as read by this run
        log.info("[%s] step %s (%s) ...", name, spec.name, spec.uses)
        workdir = out / spec.name
        workdir.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        produced = STEPS[spec.uses](StepContext(spec.name, workdir, out), **params)
        outputs = {}
        for key, p in produced.get("outputs", {}).items():
            p = Path(p)
            if not p.exists():
                raise RuntimeError(f"step {spec.name} reported output {key}={p} but it does not exist")
            outputs[key] = {"path": str(p), "bytes": _size(p)}
        man = {
            "pipeline": name, "step": spec.name, "uses": spec.uses, "params": params,
            "params_hash": _hash(spec.uses, params), "inputs": inputs, "outputs": outputs,
            "results": produced.get("results", {}), "seconds": round(time.time() - t0, 2),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        write_json(manifest_path(out, spec.name), man)
        done[spec.name] = {**man, "skipped": False}
    return done
