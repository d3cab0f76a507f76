"""Data path: validation at the boundary, zarr stores, streaming datasets, niches, write-back.

Never imports ``xscale.models``.
"""
