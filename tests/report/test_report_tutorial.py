"""The tutorial notebook runs end to end at tiny settings and is kept in sync with its builder."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "notebooks" / "tutorial.ipynb"

# Public API the tutorial promises to show; a cell calling each must exist.
PUBLIC_CALLS = (
    "xscale.datasets.load",
    "run_staged",
    "xscale.tl.embed_cells",
    "xscale.tl.embed_niches",
    "xscale.tl.domains",
    "LatentIndex.open",
    "xscale.tl.transfer_labels",
    "decode_hit",
    "finetune(",
    "build_report(",
)


def _notebook():
    import nbformat

    return nbformat.read(NOTEBOOK, as_version=4)


def _set_parameters(nb, **values: object) -> None:
    """Replace assignments in the cell tagged ``parameters`` (papermill's convention)."""
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    src = cell.source
    for name, value in values.items():
        src, n = re.subn(rf"^{name} = .*$", f"{name} = {value!r}", src, flags=re.MULTILINE)
        assert n == 1, f"parameter {name} not found in the parameters cell"
    cell.source = src


def test_tutorial_matches_builder_and_uses_public_api() -> None:
    import importlib.util

    import nbformat

    spec = importlib.util.spec_from_file_location(
        "build_tutorial", ROOT / "notebooks" / "build_tutorial.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    nb = _notebook()
    nbformat.validate(nb)
    built = mod.build()
    assert [c.source for c in nb.cells] == [c.source for c in built.cells], (
        "notebooks/tutorial.ipynb differs from notebooks/build_tutorial.py; run the builder"
    )
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    for call in PUBLIC_CALLS:
        assert call in code, call
    # public API only: no private names of xscale imported or called
    assert not re.search(r"xscale\.[\w.]*\._\w", code)
    assert not re.search(r"from xscale[\w.]* import [^\n]*\b_\w", code)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), (
        "store the notebook without outputs"
    )


def test_tutorial_first_steps_execute(tmp_path: Path) -> None:
    """Fast default variant: the cells before training (imports, loading, the first plot) run."""
    from nbclient import NotebookClient

    nb = _notebook()
    _set_parameters(nb, OUT=str(tmp_path / "run"))
    first_training = next(i for i, c in enumerate(nb.cells) if "run_staged(" in c.source)
    nb.cells = nb.cells[:first_training]
    NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs)
    assert "held-out slide: 20180424_BZ14_control" in text
    assert any("image/png" in o.get("data", {}) for o in outputs), "the layer map was not drawn"


# Several CPU minutes on a busy 2-core machine (about 75-130 s of CPU time): run with `make test-slow`.
@pytest.mark.slow
def test_tutorial_executes_at_tiny_settings(tmp_path: Path) -> None:
    from nbclient import NotebookClient

    nb = _notebook()
    _set_parameters(
        nb,
        PRESET="tiny",
        LEVEL1_EPOCHS=1,
        LEVEL2_EPOCHS=1,
        FINETUNE_EPOCHS=1,
        MAX_STEPS=20,
        OUT=str(tmp_path / "run"),
        REPORT_EMBEDDING="pca",
    )
    NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    errors = [
        o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"
    ]
    assert not errors
    out = tmp_path / "run"
    assert (out / "cells.zarr").is_dir() and (out / "report.html").is_file()
    html = (out / "report.html").read_text()
    assert '<section id="reconstruction">' in html and "data:image/png;base64," in html
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "ARI against annotated layers" in text and "trainable parameters" in text
