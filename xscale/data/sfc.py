"""Space-filling-curve orders (Morton / Hilbert) so that nearby cells sit in nearby rows.

Coordinates are quantised per slide onto a 2^bits × 2^bits grid (same scale on both axes,
so the order ignores units), then ordered along the curve. A store written in this order
keeps a niche's cells in few chunks.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd

from xscale.errors import XscaleInputError

Curve = Literal["hilbert", "morton"]
CURVES: tuple[str, ...] = ("hilbert", "morton")


def quantize(coords: np.ndarray, bits: int = 16) -> np.ndarray:
    """Map (n, 2) coordinates onto integer grid cells in [0, 2^bits). -> (n, 2) int64.

    The bounding box's longer side spans the grid; both axes share one scale.
    """
    coords = np.asarray(coords, dtype=np.float64)
    if coords.shape[0] == 0:
        return np.zeros((0, 2), dtype=np.int64)
    lo = coords.min(axis=0)
    extent = float((coords.max(axis=0) - lo).max())
    side = (1 << bits) - 1
    if extent <= 0:
        return np.zeros(coords.shape, dtype=np.int64)
    q = np.floor((coords - lo) / extent * side + 0.5).astype(np.int64)
    return np.clip(q, 0, side)


def _spread_bits(v: np.ndarray) -> np.ndarray:
    """Insert a zero bit between each of the low 32 bits of v. (n,) uint64 -> (n,) uint64."""
    v = v.astype(np.uint64) & np.uint64(0xFFFFFFFF)
    for shift, mask in ((16, 0x0000FFFF0000FFFF), (8, 0x00FF00FF00FF00FF), (4, 0x0F0F0F0F0F0F0F0F),
                        (2, 0x3333333333333333), (1, 0x5555555555555555)):
        v = (v | (v << np.uint64(shift))) & np.uint64(mask)
    return v


def morton_key(ix: np.ndarray, iy: np.ndarray) -> np.ndarray:
    """Z-order key interleaving the bits of integer grid coordinates. -> (n,) uint64."""
    return _spread_bits(np.asarray(ix)) | (_spread_bits(np.asarray(iy)) << np.uint64(1))


def hilbert_key(ix: np.ndarray, iy: np.ndarray, bits: int = 16) -> np.ndarray:
    """Hilbert-curve index of integer grid coordinates in [0, 2^bits). -> (n,) int64.

    Vectorised form of the classic ``xy2d``: consecutive keys are grid neighbours.
    """
    x = np.asarray(ix, dtype=np.int64).copy()
    y = np.asarray(iy, dtype=np.int64).copy()
    n = np.int64(1) << bits
    d = np.zeros(x.shape, dtype=np.int64)
    s = n >> 1
    while s > 0:
        rx = (x & s) > 0
        ry = (y & s) > 0
        d += s * s * ((3 * rx.astype(np.int64)) ^ ry.astype(np.int64))
        # rotate the quadrant so the sub-curve is in standard orientation
        flip = ~ry & rx
        x = np.where(flip, n - 1 - x, x)
        y = np.where(flip, n - 1 - y, y)
        swap = ~ry
        x, y = np.where(swap, y, x), np.where(swap, x, y)
        s >>= 1
    return d


def curve_key(coords: np.ndarray, *, curve: Curve = "hilbert", bits: int = 16) -> np.ndarray:
    """Curve key of each cell of one slide. coords (n, 2) -> (n,) int64/uint64."""
    if curve not in CURVES:
        raise XscaleInputError(f"curve: expected one of {list(CURVES)}, found {curve!r}.")
    q = quantize(coords, bits)
    if curve == "hilbert":
        return hilbert_key(q[:, 0], q[:, 1], bits)
    return morton_key(q[:, 0], q[:, 1])


def sfc_order(
    coords: np.ndarray,
    *,
    slides: np.ndarray | None = None,
    curve: Curve = "hilbert",
    bits: int = 16,
) -> np.ndarray:
    """Permutation ordering cells by slide (sorted slide names), then along the curve.

    Parameters
    ----------
    coords
        (n, 2) coordinates.
    slides
        (n,) slide labels or None (one slide). Each slide is quantised on its own.
    curve
        ``"hilbert"`` (better locality) or ``"morton"``.

    Returns
    -------
    (n,) int64 row indices; ``coords[order]`` is in store order. Ties keep input order.
    """
    coords = np.asarray(coords, dtype=np.float64)
    n = coords.shape[0]
    codes = np.zeros(n, dtype=np.int64) if slides is None else pd.factorize(np.asarray(slides), sort=True)[0]
    key = np.zeros(n, dtype=np.int64)
    for s in np.unique(codes):
        m = codes == s
        key[m] = curve_key(coords[m], curve=curve, bits=bits).astype(np.int64)
    return np.lexsort((np.arange(n), key, codes)).astype(np.int64)
