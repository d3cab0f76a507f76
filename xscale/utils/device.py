"""Check a Lightning accelerator name before any work, so a typo or a missing GPU fails first."""
from __future__ import annotations

from xscale.errors import XscaleInputError

ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")


def check_accelerator(name: str, option: str = "--accelerator") -> None:
    """Raise :class:`~xscale.errors.XscaleInputError` for an unknown accelerator, or for
    ``gpu`` / ``cuda`` / ``mps`` when this machine has none (Lightning would fail only once
    training starts, after the data was read and the output folder made)."""
    import torch

    if name not in ACCELERATORS:
        raise XscaleInputError(f"{option} {name!r}: expected one of {list(ACCELERATORS)}.")
    if name in ("gpu", "cuda") and not torch.cuda.is_available():
        raise XscaleInputError(f"{option} {name}: expected a CUDA GPU, found none on this machine "
                               f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}). "
                               "Pass --accelerator cpu (or auto).")
    if name == "mps" and not torch.backends.mps.is_available():
        raise XscaleInputError(f"{option} mps: expected an Apple GPU (MPS), found none. Pass --accelerator cpu.")
