"""Small shared utilities: atomic writes (:mod:`xscale.utils.atomic`) and seeding
(:mod:`xscale.utils.seed`). Nothing here imports lightning, anndata or spatialdata."""
