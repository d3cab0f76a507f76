"""Query layer: latent stores and a nearest-neighbour index (faiss) over cell and niche latents.

>>> from xscale.query import LatentIndex
>>> index = LatentIndex.open("xscale-demo/cells.zarr", level="cell")
>>> hits = index.query_cell(index.store.ids[0], k=10, cross_slide=True)
"""
from __future__ import annotations

from xscale.query.decode import decode_hit, decode_latent
from xscale.query.index import Hit, LatentIndex
from xscale.query.store import LATENT_KEYS, LatentStore, open_store

__all__ = ["Hit", "LatentIndex", "LatentStore", "LATENT_KEYS", "decode_hit", "decode_latent", "open_store"]
