"""Kill a real ``xscale run`` / ``xscale demo`` with SIGKILL mid-training; the same command resumes.

``xscale run`` is killed twice: during level 1 (re-run resumes level 1 from its last.ckpt),
then during level 2 of that re-run (the next re-run skips finished level 1 and resumes
level 2); the last re-run completes and writes cells.zarr.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from xscale.train.checkpointing import load_lightning_checkpoint

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _start(cmd: list[str], log: Path) -> tuple[subprocess.Popen, object]:
    handle = open(log, "w")
    return subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=ENV), handle


def _log_tail(log: Path | None, n: int = 3000) -> str:
    """The end of the run's log, for assertion messages (a failure says what the run printed)."""
    if log is None or not log.exists():
        return ""
    return "\n--- end of the run's log ---\n" + log.read_text(errors="replace")[-n:]


def _kill_when(proc: subprocess.Popen, last: Path, min_step: int, max_step: int, timeout: float,
               not_exists: Path | None = None, log: Path | None = None) -> int:
    """SIGKILL ``proc`` once ``last`` holds a step in [min_step, max_step); returns the step
    saved on disk. ``log``: the run's output file, quoted in any assertion message."""
    deadline = time.monotonic() + timeout
    seen: list[int] = []  # steps read from ``last`` while polling, for the failure message
    try:
        while time.monotonic() < deadline:
            assert proc.poll() is None, (
                f"the run ended (exit code {proc.returncode}) before it could be killed; "
                f"steps seen in {last}: {seen}{_log_tail(log)}")
            if last.exists():
                step = load_lightning_checkpoint(last)["global_step"]
                seen.append(step)
                if min_step <= step < max_step and (not_exists is None or not not_exists.exists()):
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    # the run may have saved again before the signal landed: what is on disk now counts
                    step = load_lightning_checkpoint(last)["global_step"]
                    assert step < max_step, (
                        f"the stage finished before the kill landed{_log_tail(log)}")
                    return step
            time.sleep(0.1)
        raise AssertionError(f"{last} never reached step {min_step} within {timeout}s; "
                             f"steps seen: {seen}{_log_tail(log)}")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()


def _resumed_step(log_text: str, last: Path) -> int:
    m = re.search(rf"Resuming from {re.escape(str(last))} \(global step (\d+)", log_text)
    assert m, f"no resume message for {last} in:\n{log_text[-3000:]}"
    return int(m.group(1))


@pytest.fixture(scope="module")
def small_h5ad(tmp_path_factory) -> Path:
    import xscale

    a = xscale.datasets.load("starmap_mpfc")
    a = a[np.sort(np.random.default_rng(0).choice(a.n_obs, 400, replace=False))].copy()
    path = tmp_path_factory.mktemp("data") / "small.h5ad"
    a.write_h5ad(path)
    return path


@pytest.mark.slow
def test_xscale_run_killed_in_each_level_resumes_and_completes(small_h5ad, tmp_path):
    out = tmp_path / "run"
    steps = 40
    cmd = [sys.executable, "-m", "xscale.cli.main", "run", "--data", str(small_h5ad), "--out", str(out),
           "--preset", "tiny", "--max-steps", str(steps), "--slide-key", "slice", "--no-progress", "--no-report"]
    l1 = out / "checkpoints" / "level1" / "checkpoints" / "last.ckpt"
    l2 = out / "checkpoints" / "level2" / "lightning" / "last.ckpt"

    # 1. killed during level 1
    proc, h = _start(cmd, tmp_path / "1.log")
    s1 = _kill_when(proc, l1, 1, steps, timeout=600, log=Path(h.name))
    h.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "checkpoints" / "level1" / "model").exists() and not (out / "cells.zarr").exists()

    # 2. same command: resumes level 1 at s1; killed during level 2
    proc, h = _start(cmd, tmp_path / "2.log")
    s2 = _kill_when(proc, l2, 1, steps, timeout=900,
                    not_exists=out / "checkpoints" / "level2" / "model", log=Path(h.name))
    h.close()
    log2 = (tmp_path / "2.log").read_text()
    assert _resumed_step(log2, l1) == s1
    assert load_lightning_checkpoint(l1)["global_step"] == steps  # level 1 completed its budget
    assert (out / "checkpoints" / "level1" / "model" / "config.json").exists()
    assert not (out / "cells.zarr").exists()

    # 3. same command: level 1 skipped, level 2 resumed at s2, run completes
    done = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    log3 = done.stdout + done.stderr
    assert "Stage level1 finished earlier" in log3
    assert _resumed_step(log3, l2) == s2
    assert load_lightning_checkpoint(l2)["global_step"] == steps
    import anndata

    z = anndata.read_zarr(out / "cells.zarr")
    assert z.n_obs == 400 and "X_xscale_niche" in z.obsm and "X_xscale_cell" in z.obsm
    assert sorted(p.name for p in out.iterdir() if "tmp" in p.name) == []


@pytest.mark.slow
def test_xscale_demo_killed_mid_training_resumes_and_completes(tmp_path):
    out = tmp_path / "demo"
    steps = 30
    cmd = [sys.executable, "-m", "xscale.cli.main", "demo", "--out", str(out), "--preset", "tiny",
           "--max-steps", str(steps), "--no-progress", "--no-report"]
    l1 = out / "checkpoints" / "level1" / "checkpoints" / "last.ckpt"
    proc, h = _start(cmd, tmp_path / "1.log")
    s1 = _kill_when(proc, l1, 1, steps, timeout=600, log=Path(h.name))
    h.close()
    assert proc.returncode == -signal.SIGKILL
    done = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _resumed_step(done.stdout + done.stderr, l1) == s1
    assert load_lightning_checkpoint(l1)["global_step"] == steps
    assert (out / "cells.zarr").is_dir() and (out / "metrics.json").is_file()



@pytest.fixture(scope="module")
def resumed_run(small_h5ad, tmp_path_factory):
    """One real ``xscale run`` SIGKILLed during level 1 and re-run to the end (shared by the tests below).

    Its domain labels have 40 missing values, to check that evaluation uses the labelled cells only.
    """
    import anndata

    tmp = tmp_path_factory.mktemp("resumed")
    a = anndata.read_h5ad(small_h5ad)
    labels = a.obs["domain_name"].astype(object).copy()
    labels.iloc[np.random.default_rng(1).choice(a.n_obs, 40, replace=False)] = np.nan
    a.obs["domain_partial"] = labels
    data = tmp / "partial.h5ad"
    a.write_h5ad(data)
    out = tmp / "run"
    steps = 16
    cmd = [sys.executable, "-m", "xscale.cli.main", "run", "--data", str(data), "--out", str(out),
           "--preset", "tiny", "--max-steps", str(steps), "--slide-key", "slice", "--domain-key", "domain_partial",
           "--no-progress", "--no-report"]
    l1 = out / "checkpoints" / "level1" / "checkpoints" / "last.ckpt"
    proc, h = _start(cmd, tmp / "1.log")
    s1 = _kill_when(proc, l1, 1, steps, timeout=600, log=Path(h.name))
    h.close()
    killed_rc, cells_after_kill = proc.returncode, (out / "cells.zarr").exists()
    done = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=900)
    return dict(out=out, steps=steps, s1=s1, l1=l1, killed_rc=killed_rc, cells_after_kill=cells_after_kill,
                done=done, adata=a)


def test_xscale_run_killed_in_level1_resumes(resumed_run):
    """Default-suite variant: one SIGKILL during level 1 of a real ``xscale run``, one re-run to the end."""
    r = resumed_run
    assert r["killed_rc"] == -signal.SIGKILL and not r["cells_after_kill"]
    assert r["done"].returncode == 0, r["done"].stderr[-3000:]
    assert _resumed_step(r["done"].stdout + r["done"].stderr, r["l1"]) == r["s1"]
    assert load_lightning_checkpoint(r["l1"])["global_step"] == r["steps"]
    assert (r["out"] / "cells.zarr").is_dir()


def test_xscale_run_evaluates_labelled_cells_only(resumed_run):
    """A label key with missing values: metrics use the labelled cells; 'nan' is not a domain."""
    import json

    r = resumed_run
    assert r["done"].returncode == 0, r["done"].stderr[-3000:]
    metrics = json.loads((r["out"] / "metrics.json").read_text())
    obs = r["adata"].obs
    expected = {s: int(g["domain_partial"].dropna().nunique()) for s, g in obs.groupby("slice", observed=True)}
    found = {s: v["n_domains"] for s, v in metrics["domains"]["per_slide"].items()}
    assert found == expected, f"missing labels must not count as a domain: {found} vs labelled {expected}"
    assert metrics["domains"]["n_labelled"] == int(obs["domain_partial"].notna().sum())
