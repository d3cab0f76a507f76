"""``LatentIndex``: nearest-neighbour search over a latent store with faiss.

Index kinds (``kind=``):

- ``"flat"``: exact search (``faiss.IndexFlatL2``);
- ``"ivf"``: inverted lists over k-means cells (``faiss.IndexIVFFlat``), approximate;
- ``"hnsw"``: graph index (``faiss.IndexHNSWFlat``), approximate;
- ``"auto"`` (default): ``"flat"`` up to ``exact_max`` cells (100,000), ``"ivf"`` above.

Distances are Euclidean (L2, not squared) in latent space. Slide filters use faiss ID
selectors. On an approximate index (IVF, HNSW) a filter that leaves at most ``exact_max``
cells is searched exactly on those cells; a wider one probes proportionally more IVF lists;
and a search that comes back short of ``k`` is redone exactly, so a filter does not cost
recall beyond the index's own approximation.

Query semantics
---------------
- by cell: the cell's latent is the query; the cell itself is excluded from its hits.
- by niche: a cell query on a ``level="niche"`` index (the niche centred on that cell).
- by vector: any (F,) or (K, D) vector of the index's latent size.
- by region ``(x0, y0, x1, y1)`` (inclusive box in the store's coordinate units, within one
  slide): ``mode="mean"`` queries with the mean latent of the cells inside the box and
  excludes those cells from the hits (regions elsewhere that look like this one);
  ``mode="cells"`` returns the cells inside the box, nearest to their mean first.
- ``slide=S`` keeps hits on slide S only; ``cross_slide=True`` drops hits on the query's own
  slide (cross-slide retrieval).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from xscale.errors import XscaleInputError
from xscale.query.store import LatentStore, Level, open_store

log = logging.getLogger(__name__)

IndexKind = Literal["auto", "flat", "ivf", "hnsw"]
RegionMode = Literal["mean", "cells"]


@dataclass
class Hit:
    """One search result: the row in the store, its id, L2 distance, slide and position."""

    row: int
    id: str
    distance: float
    slide: str | None
    x: float | None
    y: float | None
    obs: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: ``id``, ``distance``, ``slide``, ``x``, ``y``, then the obs columns."""
        out: dict[str, Any] = {"id": self.id, "distance": self.distance, "slide": self.slide, "x": self.x, "y": self.y}
        for k, v in self.obs.items():
            out.setdefault(k, v)
        return out


def _check_k(k: Any) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, float, np.integer, np.floating)) or int(k) != k or k < 1:
        raise XscaleInputError(f"k: expected a whole number of hits >= 1, found {k!r}.")


def _name(slide: Any) -> str | None:
    """A slide given as any value (e.g. 1 for an integer slide column) as the store's string name."""
    return None if slide is None else str(slide)


def _json_value(v: Any) -> Any:
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    try:
        import pandas as pd

        if pd.isna(v):
            return None
    except (TypeError, ValueError):
        pass
    return str(v)


class LatentIndex:
    """A faiss index over one level of a latent store.

    Parameters
    ----------
    store
        A :class:`~xscale.query.store.LatentStore` (see :func:`LatentIndex.open`).
    kind
        ``"auto"``, ``"flat"``, ``"ivf"`` or ``"hnsw"`` (see module docstring).
    exact_max
        Largest store that ``"auto"`` indexes exactly.
    nprobe, ef_search
        Search breadth for ``"ivf"`` (lists probed) and ``"hnsw"`` (candidate list size).
    seed
        Seed of the IVF k-means training.
    """

    def __init__(
        self,
        store: LatentStore,
        *,
        kind: IndexKind = "auto",
        exact_max: int = 100_000,
        nprobe: int = 16,
        ef_search: int = 128,
        seed: int = 0,
    ) -> None:
        import faiss

        if kind not in ("auto", "flat", "ivf", "hnsw"):
            raise XscaleInputError(f"Unknown index kind {kind!r}; expected one of auto, flat, ivf, hnsw.")
        if store.n == 0:
            raise XscaleInputError("The store holds no cells; nothing to index.")
        self.store = store
        n, d = store.latents.shape
        self.kind: str = ("flat" if n <= exact_max else "ivf") if kind == "auto" else kind
        self.exact_max = exact_max
        if self.kind == "flat":
            self._index = faiss.IndexFlatL2(d)
        elif self.kind == "ivf":
            nlist = int(max(1, min(4 * math.sqrt(n), n // 39)))
            self._index = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, nlist)
            self._index.cp.seed = seed
            self._index.train(store.latents)
            self.nprobe, self.nlist = min(nprobe, nlist), nlist
        else:
            self._index = faiss.IndexHNSWFlat(d, 32)
            self.ef_search = ef_search
        self._index.add(store.latents)
        self._slides = store.slides
        self._row_of = {cid: i for i, cid in enumerate(store.ids.astype(str))}
        log.info("built %s index over %d %s latents of size %d", self.kind, n, store.level, d)

    @classmethod
    def open(
        cls, path, *, level: Level = "cell", slide_key: str | None = None, kind: IndexKind = "auto",
        exact_max: int = 100_000,
    ) -> LatentIndex:
        """Read ``path`` (a ``cells.zarr``) and index its ``level`` latents."""
        return cls(open_store(path, level=level, slide_key=slide_key), kind=kind, exact_max=exact_max)

    # ----------------------------------------------------------------- helpers
    @property
    def dim(self) -> int:
        return self.store.latents.shape[1]

    def row(self, cell_id: str) -> int:
        """Row of ``cell_id`` in the store."""
        try:
            return self._row_of[str(cell_id)]
        except KeyError:
            examples = list(self.store.ids[:3])
            raise XscaleInputError(
                f"Cell id {cell_id!r} not found in the store ({self.store.n} cells; ids look like {examples}). "
                "Pass an id from the store's obs index."
            ) from None

    def slide_names(self) -> list[str]:
        return [] if self._slides is None else sorted(set(self._slides))

    def _check_slide(self, slide: str | None) -> None:
        if slide is None:
            return
        if self._slides is None:
            raise XscaleInputError("The store has no slide column; drop --slide or pass the slide key.")
        if slide not in set(self._slides):
            raise XscaleInputError(f"Slide {slide!r} not in the store. Available slides: {self.slide_names()}.")

    def _allowed(
        self, slide: str | None, exclude_slide: str | None, exclude_rows: np.ndarray | None
    ) -> np.ndarray | None:
        """Boolean mask (n,) of rows a hit may come from, or None for all."""
        if slide is None and exclude_slide is None and (exclude_rows is None or len(exclude_rows) == 0):
            return None
        mask = np.ones(self.store.n, dtype=bool)
        if slide is not None:
            mask &= self._slides == slide
        if exclude_slide is not None and self._slides is not None:
            mask &= self._slides != exclude_slide
        if exclude_rows is not None and len(exclude_rows):
            mask[exclude_rows] = False
        return mask

    def _search(self, q: np.ndarray, k: int, allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """(Q, F) queries -> (Q, k') squared distances and rows, k' <= k; -1 rows dropped later."""
        import faiss

        _check_k(k)
        n_allowed = self.store.n if allowed is None else int(allowed.sum())
        k_eff = min(int(k), n_allowed)
        if k_eff == 0:
            return np.zeros((q.shape[0], 0), np.float32), np.zeros((q.shape[0], 0), np.int64)
        if allowed is not None and self.kind != "flat" and n_allowed <= self.exact_max:
            # a filter leaves few enough rows to search them all: exact, so a filter never costs recall
            # (the approximate index probes lists chosen without it and can return farther allowed rows)
            return self._exact(q, k_eff, np.flatnonzero(allowed))
        sel = None if allowed is None else faiss.IDSelectorBatch(np.flatnonzero(allowed).astype(np.int64))
        if self.kind == "ivf":  # probe more lists when the filter keeps a smaller share of the cells
            nprobe = min(self.nlist, math.ceil(self.nprobe * self.store.n / max(n_allowed, 1)))
            params = faiss.SearchParametersIVF(sel=sel, nprobe=nprobe)
        elif self.kind == "hnsw":
            params = faiss.SearchParametersHNSW(sel=sel, efSearch=max(self.ef_search, k_eff))
        else:
            params = faiss.SearchParameters(sel=sel) if sel is not None else None
        D, idx = self._index.search(q, k_eff, params=params)
        if self.kind != "flat" and (idx < 0).any():
            # An approximate index under a narrow filter can come back short: redo exactly.
            rows = np.flatnonzero(allowed) if allowed is not None else np.arange(self.store.n)
            return self._exact(q, k_eff, rows)
        return D, idx

    def _exact(self, q: np.ndarray, k: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact search of (Q, F) queries among ``rows`` of the store: squared distances and store rows."""
        import faiss

        exact = faiss.IndexFlatL2(self.dim)
        exact.add(self.store.latents[rows])
        D, idx_sub = exact.search(q, k)
        return D, np.where(idx_sub >= 0, rows[np.maximum(idx_sub, 0)], -1)

    def _hits(self, D: np.ndarray, idx: np.ndarray, columns: list[str] | None) -> list[Hit]:
        obs = self.store.obs
        cols = list(obs.columns) if columns is None else columns
        coords = self.store.coords
        hits = []
        for d, r in zip(D, idx, strict=True):
            if r < 0:
                continue
            r = int(r)
            row = obs.iloc[r]
            hits.append(
                Hit(
                    row=r,
                    id=str(obs.index[r]),
                    distance=float(math.sqrt(max(float(d), 0.0))),
                    slide=None if self._slides is None else str(self._slides[r]),
                    x=None if coords is None else float(coords[r, 0]),
                    y=None if coords is None else float(coords[r, 1]),
                    obs={c: _json_value(row[c]) for c in cols},
                )
            )
        return hits

    def _as_query(self, vector: np.ndarray) -> np.ndarray:
        try:
            v = np.asarray(vector, dtype=np.float32).reshape(-1)
        except (TypeError, ValueError) as err:
            raise XscaleInputError(f"Query vector: expected numbers, found values of type "
                                   f"{np.asarray(vector).dtype} ({err}). Save a latent with numpy.save.") from err
        if v.size != self.dim or not np.isfinite(v).all():
            raise XscaleInputError(
                f"Query vector has {v.size} values (finite: {bool(np.isfinite(v).all())}); this {self.store.level} "
                f"index expects {self.dim} finite values (latent shape {self.store.latent_shape}). "
                "Save one latent from the same store/model with numpy.save."
            )
        return v[None, :]

    # ----------------------------------------------------------------- queries
    def query_vector(
        self, vector: np.ndarray, k: int = 10, *, slide: str | None = None, exclude_slide: str | None = None,
        columns: list[str] | None = None,
    ) -> list[Hit]:
        """The ``k`` nearest cells to a latent vector, (F,) or (K, D)."""
        slide, exclude_slide = _name(slide), _name(exclude_slide)
        self._check_slide(slide)
        q = self._as_query(vector)
        D, idx = self._search(q, k, self._allowed(slide, exclude_slide, None))
        return self._hits(D[0], idx[0], columns)

    def query_cell(
        self, cell_id: str, k: int = 10, *, slide: str | None = None, cross_slide: bool = False,
        columns: list[str] | None = None,
    ) -> list[Hit]:
        """The ``k`` nearest cells to cell ``cell_id`` (itself excluded).

        ``cross_slide=True`` keeps only hits from slides other than the cell's own.
        """
        slide = _name(slide)
        self._check_slide(slide)
        r = self.row(cell_id)
        exclude = self._query_slide(r) if cross_slide else None
        allowed = self._allowed(slide, exclude, np.array([r]))
        D, idx = self._search(self.store.latents[r : r + 1], k, allowed)
        return self._hits(D[0], idx[0], columns)

    def query_niche(self, cell_id: str, k: int = 10, **options: Any) -> list[Hit]:
        """Niche search: the niches most like the one centred on ``cell_id`` (niche-level index only)."""
        if self.store.level != "niche":
            raise XscaleInputError("query_niche needs an index over niche latents; open it with level='niche'.")
        return self.query_cell(cell_id, k, **options)

    def _query_slide(self, r: int) -> str:
        if self._slides is None:
            raise XscaleInputError("Cross-slide retrieval needs a slide column in the store; pass the slide key.")
        return str(self._slides[r])

    def region_rows(self, box: tuple[float, float, float, float], *, region_slide: str | None = None) -> np.ndarray:
        """Rows of the cells inside the inclusive box ``(x0, y0, x1, y1)`` on ``region_slide``."""
        region_slide = _name(region_slide)
        coords = self.store.coords
        if coords is None:
            raise XscaleInputError("The store has no obsm['spatial']; region queries need coordinates.")
        x0, y0, x1, y1 = (float(b) for b in box)
        if x0 > x1 or y0 > y1:
            raise XscaleInputError(f"Region {box} is not x0,y0,x1,y1 with x0 <= x1 and y0 <= y1.")
        names = self.slide_names()
        if region_slide is None and len(names) > 1:
            raise XscaleInputError(
                f"The store holds {len(names)} slides {names}; coordinates overlap between slides. "
                "Name the slide the region is drawn on (--region-slide S / region_slide=S)."
            )
        self._check_slide(region_slide)
        inside = (coords[:, 0] >= x0) & (coords[:, 0] <= x1) & (coords[:, 1] >= y0) & (coords[:, 1] <= y1)
        if region_slide is not None:
            inside &= self._slides == region_slide
        rows = np.flatnonzero(inside)
        if rows.size == 0:
            lo, hi = coords.min(0), coords.max(0)
            raise XscaleInputError(
                f"No cells inside region {box}. The store's coordinates span x {lo[0]:.1f}..{hi[0]:.1f}, "
                f"y {lo[1]:.1f}..{hi[1]:.1f}."
            )
        return rows

    def query_region(
        self, box: tuple[float, float, float, float], k: int = 10, *, region_slide: str | None = None,
        slide: str | None = None, cross_slide: bool = False, mode: RegionMode = "mean",
        columns: list[str] | None = None,
    ) -> list[Hit]:
        """Search with a region's mean latent (``mode="mean"``) or list its cells (``mode="cells"``).

        See the module docstring for the exact semantics.
        """
        region_slide, slide = _name(region_slide), _name(slide)
        _check_k(k)
        if cross_slide and self._slides is None:
            raise XscaleInputError("Cross-slide retrieval needs a slide column in the store; pass the slide key.")
        if mode == "cells" and (slide is not None or cross_slide):
            raise XscaleInputError(
                "Region mode 'cells' lists the region's own cells (all on its slide), so slide= / cross_slide= "
                "(--slide / --cross-slide) have nothing to filter; drop them, or search with mode 'mean'."
            )
        rows = self.region_rows(box, region_slide=region_slide)
        q = self.store.latents[rows].mean(0, keepdims=True)  # (1, F)
        if mode == "cells":
            d = ((self.store.latents[rows] - q) ** 2).sum(1)
            order = np.argsort(d, kind="stable")[: int(k)]
            return self._hits(d[order], rows[order], columns)
        if mode != "mean":
            raise XscaleInputError(f"Unknown region mode {mode!r}; expected 'mean' or 'cells'.")
        self._check_slide(slide)
        exclude = (region_slide or (self.slide_names() or [None])[0]) if cross_slide else None
        D, idx = self._search(q, k, self._allowed(slide, exclude, rows))
        return self._hits(D[0], idx[0], columns)
