"""Regenerate docs/demo_domains.png from a finished demo run.

    .venv/bin/python docs/make_demo_figure.py xscale-demo/cells.zarr docs/demo_domains.png

Left: the annotated cortical layers of the held-out STARmap slice; right: ``obs["xscale_domain"]``.
"""
import sys

import anndata as ad
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from sklearn.metrics import adjusted_rand_score  # noqa: E402

import xscale  # noqa: E402

HELD_OUT = "20180424_BZ14_control"


def main(store: str, out: str) -> float:
    cells = ad.read_zarr(store)
    held = cells[cells.obs["slice"] == HELD_OUT].copy()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, title in [(axes[0], "domain_name", "annotated cortical layers"),
                           (axes[1], "xscale_domain", "xscale domains (niche latents)")]:
        held.obs[key] = held.obs[key].astype(str).astype("category")
        xscale.tl.plot_domains(held, key=key, ax=ax, point_size=8)
        ax.set_title(title)
    ari = adjusted_rand_score(held.obs["domain_name"].astype(str), held.obs["xscale_domain"].astype(str))
    fig.suptitle(f"STARmap slice {HELD_OUT} (held out, never trained on): ARI {ari:.2f}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return ari


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: make_demo_figure.py CELLS_ZARR OUT_PNG")
    print(f"ARI {main(sys.argv[1], sys.argv[2]):.3f}")
