"""The README stays true: its Python quickstart runs, its benchmark table matches the results."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
TINY_BUDGET = (
    'budget = {"level1_preset": "tiny", "level2_preset": "tiny", "level1_max_steps": 10, '
    '"level2_max_steps": 20, "progress": False}'
)


def _quickstart() -> str:
    text = README.read_text()
    section = text.split("## Quickstart (Python)", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_quickstart_runs(tmp_path, monkeypatch, capsys):
    code = _quickstart()
    assert "budget = {}" in code, "the quickstart's budget line is what the test shrinks"
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code.replace(re.search(r"budget = \{\}.*", code).group(0), TINY_BUDGET), "README", "exec"), scope)
    cells = scope["cells"]
    assert cells.obsm["X_xscale_cell"].shape[0] == cells.n_obs == 3190
    assert np.isfinite(cells.obsm["X_xscale_niche"]).all()
    assert cells.obs["xscale_domain"].nunique() == 4
    assert (tmp_path / "domains.png").stat().st_size > 1000
    hits = scope["hits"]
    assert len(hits) == 5 and all(h.slide != cells.obs["slice"].iloc[0] for h in hits)
    assert "[(" in capsys.readouterr().out


def test_readme_benchmark_table_is_generated_from_results():
    spec = importlib.util.spec_from_file_location("summarize", ROOT / "benchmarks" / "summarize.py")
    summarize = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summarize)
    block = README.read_text().split(summarize.START, 1)[1].split(summarize.END, 1)[0]
    assert block.strip() == summarize.markdown().strip(), "run: python benchmarks/summarize.py --write README.md"
    assert "| cell level, starmap_mpfc" in block


def test_readme_shows_the_two_commands():
    text = README.read_text()
    assert "make demo" in text and "make test" in text
    assert "make test" in (ROOT / ".ci" / "run").read_text()
