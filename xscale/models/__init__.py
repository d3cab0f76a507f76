"""Models: typed configs, GeneToCell (level 1), CellToTissue (level 2), heads, gene embedders.

Plain torch; no anndata, spatialdata or lightning imports.
"""
