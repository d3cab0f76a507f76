"""Fixtures for reliability tests: planted malicious pickles and a tiny registered model."""
from __future__ import annotations

import pickle
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from xscale.models.io import register_model

# Keep hypothesis' caches out of the working tree (it would create ./.hypothesis).
try:
    from hypothesis.configuration import set_hypothesis_home_dir

    set_hypothesis_home_dir(tempfile.mkdtemp(prefix="xscale-hypothesis-"))
except ImportError:  # pragma: no cover - hypothesis is a dev dependency
    pass


class _Payload:
    """Unpickling this object runs ``exec``, which creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


@dataclass
class TinyConfig:
    n_in: int = 4
    n_out: int = 2


@register_model("reliability_tiny_linear", TinyConfig)
class TinyLinear(nn.Module):
    def __init__(self, config: TinyConfig) -> None:
        super().__init__()
        self.config = config
        self.lin = nn.Linear(config.n_in, config.n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _restore_global_determinism(monkeypatch):
    """seed_everything changes process-wide settings; undo them so other tests are unaffected."""
    import os

    for var in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS", "CUBLAS_WORKSPACE_CONFIG"):
        monkeypatch.setenv(var, os.environ[var]) if var in os.environ else monkeypatch.delenv(var, raising=False)
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn


@pytest.fixture
def marker(tmp_path) -> Path:
    """Path that a planted pickle would create if it were ever unpickled."""
    return tmp_path / "PWNED"


@pytest.fixture
def plant(marker):
    """``plant(path, kind)`` writes a malicious file: kind in {"torch", "torch-legacy", "pickle"}."""

    def _plant(path: Path, kind: str = "torch") -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        evil = {"state_dict": {"w": torch.zeros(2)}, "global_step": 3, "epoch": 0, "payload": _Payload(marker)}
        if kind == "torch":
            torch.save(evil, path)
        elif kind == "torch-legacy":
            torch.save(evil, path, _use_new_zipfile_serialization=False)
        elif kind == "pickle":
            path.write_bytes(pickle.dumps(evil))
        else:
            raise ValueError(kind)
        return path

    return _plant
