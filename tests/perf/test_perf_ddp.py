"""A real 2-process DDP fit on CPU: disjoint data per rank, identical weights at the end."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

SCRIPT = Path(__file__).with_name("ddp_fit_script.py")


def test_ddp_two_ranks_disjoint_data_identical_weights(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True,
                          timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (np.load(tmp_path / f"rank{r}.npz") for r in (0, 1))
    assert int(r0["__world__"]) == 2 and int(r1["__world__"]) == 2
    seen0, seen1 = set(r0["__seen__"].tolist()), set(r1["__seen__"].tolist())
    # 256 cells, batch 16, two ranks: 8 steps each, every cell exactly once overall.
    assert len(r0["__seen__"]) == len(seen0) == 128 and len(seen1) == 128
    assert seen0.isdisjoint(seen1) and seen0 | seen1 == set(range(256))
    assert int(r0["__steps__"]) == int(r1["__steps__"]) == 8
    weights = [k for k in r0.files if not k.startswith("__")]
    assert weights and set(weights) == {k for k in r1.files if not k.startswith("__")}
    for k in weights:
        np.testing.assert_array_equal(r0[k], r1[k], err_msg=k)
    # Training moved the weights, so equality is not that of two untouched copies.
    assert float(r0["__moved__"]) > 0 and float(r0["__moved__"]) == float(r1["__moved__"])
