"""Write ``notebooks/tutorial.ipynb`` from the cells below (outputs are not stored).

Edit the tutorial here, then run ``python notebooks/build_tutorial.py``. The notebook uses
the public API only; ``tests/report/test_report_tutorial.py`` executes it at tiny settings.
"""
from __future__ import annotations

from pathlib import Path

import nbformat

HERE = Path(__file__).parent

CELLS: list[tuple[str, str]] = [
    ("md", """# xscale tutorial: from measured cells to cell states, tissue domains and queries

This notebook walks through xscale on a real spatial transcriptomics data set, the STARmap
mouse prefrontal cortex (Wang et al. 2018, *Science*): 3,190 cells from three mice, 166
genes measured in every cell, 15 annotated cell types and 4 annotated cortical layers.

xscale learns two levels of representation, each by compressing and reconstructing:

* **level 1 (genes → cells)** reads the expression of one cell and compresses it into a few
  *cell latents*: a short numeric summary of the cell's state from which its expression can
  be decoded back;
* **level 2 (cells → tissue)** reads the cell latents of a cell and its spatial neighbours
  (its *niche*) together with their positions, and compresses them into *niche latents*:
  a summary of the cell's micro-environment, used to find **spatial domains**.

Steps: load → train both levels → embed new cells → domains → query the latents → decode a
latent back to expression → fine-tune for cell-type prediction → write the HTML report.
One slide (mouse) is **held out**: the models never see it during training, so everything
we measure on it shows how xscale behaves on new tissue."""),
    ("params", """# Parameters. The defaults train at "small" settings, as `make demo` does (several minutes
# on a 2-core CPU). The test suite runs this notebook with PRESET="tiny" and MAX_STEPS=20.
PRESET = "small"           # model size per level: "tiny", "small" or "base" (GPU)
LEVEL1_EPOCHS = 20         # passes over the training cells, level 1 (genes -> cells)
LEVEL2_EPOCHS = 30         # passes over the training niches, level 2 (cells -> niches)
FINETUNE_EPOCHS = 5        # passes of the fine-tuning step
MAX_STEPS = -1             # cap on optimisation steps per training run (-1: no cap)
N_DOMAINS = 4              # spatial domains to find (4 cortical layers are annotated)
OUT = "xscale-tutorial"    # checkpoints, latent store and report go here
REPORT_EMBEDDING = "auto"  # "auto" (UMAP) or "pca" (faster) for the report's latent map
SEED = 0"""),
    ("code", """import logging
import warnings

import numpy as np
import pandas as pd

import xscale

warnings.filterwarnings("ignore")
logging.basicConfig(level=logging.WARNING)
for noisy in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
    logging.getLogger(noisy).setLevel(logging.WARNING)  # keep Lightning's chatter out of the notebook"""),
    ("md", """## 1. Load the data

`xscale.datasets.load` returns an `AnnData`: raw counts in `X` (cells × genes), cell positions
in `obsm["spatial"]`, annotations in `obs`. `xscale.datasets.info` says which columns hold
the labels and the slides, and which slide is held out."""),
    ("code", """info = xscale.datasets.info("starmap_mpfc")
adata = xscale.datasets.load("starmap_mpfc")
HOLDOUT = info.holdout
is_held = (adata.obs[info.slide_key] == HOLDOUT).to_numpy()  # True for cells of the held-out slide
train_slides = sorted(set(adata.obs[info.slide_key]) - {HOLDOUT})
print(adata)
print("held-out slide:", HOLDOUT)
adata.obs[info.slide_key].value_counts()"""),
    ("md", """The annotated cortical layers, one panel per slide. Layers run as bands across the tissue;
a good tissue-level representation should recover them without being told."""),
    ("code", """fig = xscale.tl.plot_domains(adata, key=info.domain_key, slide_key=info.slide_key)"""),
    ("md", """## 2. Train both levels (staged)

`run_staged` fits level 1 on the cells of the training slides, embeds **every** cell
(including the held-out slide) into cell latents, fits level 2 on niches centred on training
cells, embeds every niche, and clusters the niche latents into domains. Each stage is saved
under `OUT/checkpoints/`; running the cell again skips the finished stages. The result is a
*latent store*, `OUT/cells.zarr`: the AnnData with `obsm["X_xscale_cell"]`,
`obsm["X_xscale_niche"]` and `obs["xscale_domain"]`."""),
    ("code", """from xscale.train.staged import run_staged

result = run_staged(
    adata, OUT,
    level1_preset=PRESET, level2_preset=PRESET,
    train_slides=train_slides, slide_key=info.slide_key, n_domains=N_DOMAINS,
    level1_epochs=LEVEL1_EPOCHS, level2_epochs=LEVEL2_EPOCHS,
    level1_max_steps=MAX_STEPS, level2_max_steps=MAX_STEPS,
    seed=SEED, progress=False,
)
print("store:", result.store)
print("seconds per stage:", {k: round(v, 1) for k, v in result.seconds.items()}, "skipped:", result.skipped)
print("cell latents:", adata.obsm["X_xscale_cell"].shape, " niche latents:", adata.obsm["X_xscale_niche"].shape)"""),
    ("md", """## 3. Embed new cells with the trained model

With trained models you can embed any data set measured on an overlapping gene panel. Here we
take the held-out slide as if it were a new experiment: only counts and positions, no
latents. `xscale.tl.embed_cells` writes one cell latent per cell to
`obsm["X_xscale_cell"]` (K latent tokens × D numbers per cell, flattened)."""),
    ("code", """new = adata[is_held].copy()
for key in ("X_xscale_cell", "X_xscale_niche"):
    new.obsm.pop(key, None)
new.obs = new.obs.drop(columns=["xscale_domain"])

xscale.tl.embed_cells(new, result.level1)
print("cell latents of the new slide:", new.obsm["X_xscale_cell"].shape)"""),
    ("md", """## 4. Niches and spatial domains

`xscale.tl.embed_niches` builds, for every cell, the niche centred on it (the cell and its
nearest neighbours, positions relative to the centre) and compresses it with level 2 into
`obsm["X_xscale_niche"]`. `xscale.tl.domains` clusters the niche latents (k-means) into
`obs["xscale_domain"]`. We score the agreement with the annotated layers by the adjusted
Rand index (ARI: 1 = identical partitions, 0 = chance) and compare with a strong simple
baseline computed on the same cells: PCA of expression averaged over each cell and its 10
nearest spatial neighbours. To cluster several slides together, pass
`slide_key="slice"`: each slide's niche latents are centred first, so that a shift of a
whole slide (a batch effect) does not become a domain of its own; `xscale run` and
`make demo` do this."""),
    ("code", """from sklearn.metrics import adjusted_rand_score

from xscale.eval.metrics import cluster_scores, log_normalized, pca, spatial_mean

xscale.tl.embed_niches(new, result.level2)
xscale.tl.domains(new, N_DOMAINS)
truth = new.obs[info.domain_key].astype(str)
ari_xscale = adjusted_rand_score(truth, new.obs["xscale_domain"])

pcs = pca(log_normalized(adata.X[~is_held]), [log_normalized(new.X)])[1]  # PCA fitted on training slides
baseline = cluster_scores(spatial_mean(pcs, new.obsm["spatial"], k=10), truth, N_DOMAINS)
print(f"held-out slide, ARI against annotated layers: xscale {ari_xscale:.3f}, "
      f"PCA + spatial mean {baseline['ari']:.3f}")"""),
    ("md", """With `PRESET="tiny"` or a small `MAX_STEPS` the models are barely trained and this score
says little; the default settings give the comparison reported by `make demo`. The map of
the domains found on the held-out slide:"""),
    ("code", """fig = xscale.tl.plot_domains(new, key="xscale_domain")"""),
    ("md", """## 5. Query the latent store

`xscale.query.LatentIndex` indexes the latents of a store (exact search with faiss for
stores this size, an approximate index for millions of cells). Ask for the cells most
similar to a given cell, here restricted to *other* slides (`cross_slide=True`): do the
answers share its cell type? Then the same for niches: which neighbourhoods elsewhere look
like this one, and are they in the same layer?"""),
    ("code", """from xscale.query import LatentIndex

cells = LatentIndex.open(result.store, level="cell")
cell_id = new.obs_names[0]
print("query cell:", cell_id, "| type:", adata.obs.loc[cell_id, info.label_key],
      "| layer:", adata.obs.loc[cell_id, info.domain_key])
hits = cells.query_cell(cell_id, k=10, cross_slide=True)
pd.DataFrame([h.to_dict() for h in hits])[["id", "distance", "slide", info.label_key, info.domain_key]]"""),
    ("code", """niches = LatentIndex.open(result.store, level="niche")
niche_hits = niches.query_niche(cell_id, k=10, cross_slide=True)
same_layer = np.mean([h.obs[info.domain_key] == adata.obs.loc[cell_id, info.domain_key] for h in niche_hits])
print(f"{same_layer:.0%} of the 10 most similar niches on other slides lie in the same layer")"""),
    ("md", """**Label transfer.** `xscale.tl.transfer_labels` gives each query cell the majority label of
its nearest reference cells in latent space, with a confidence (the share of votes). Here the
training slides are the reference and the held-out slide is the query."""),
    ("code", """reference = adata[~is_held].copy()
xscale.tl.transfer_labels(new, reference, key=info.label_key, k=15)
acc = (new.obs[f"{info.label_key}_transferred"].astype(str) == new.obs[info.label_key].astype(str)).mean()
print(f"cell types transferred to the held-out slide: accuracy {acc:.1%}")
new.obs[[info.label_key, f"{info.label_key}_transferred", f"{info.label_key}_transferred_confidence"]].head()"""),
    ("md", """## 6. Decode a latent back to expression

The level-1 decoder turns cell latents back into expected expression, so any latent (a cell,
a query hit, an average over a region) can be read in genes. Below: the expected counts
decoded from the first query hit's latent, beside what was measured in that cell (both
scaled to 10,000 counts per cell)."""),
    ("code", """from xscale.query import decode_hit

hit = hits[0]
decoded = decode_hit(cells, hit, result.level1, genes=list(adata.var_names))  # expected counts, 10,000 in total
row = adata[hit.id]
measured = pd.Series(np.asarray(row.X.todense()).ravel(), index=adata.var_names)
measured = measured / max(measured.sum(), 1) * 1e4
table = pd.DataFrame({"decoded": decoded, "measured": measured.reindex(decoded.index)})
print(f"cell {hit.id} ({hit.obs[info.label_key]}): Pearson r over genes, log scale = "
      f"{np.corrcoef(np.log1p(table.decoded), np.log1p(table.measured))[0, 1]:.2f}")
table.sort_values("decoded", ascending=False).head(10).round(1)"""),
    ("md", """`xscale.tl.reconstruct` does the same for every cell of an AnnData and writes the expected
counts to `layers["xscale_expected"]`; the report below uses it to compare measured and
decoded expression maps."""),
    ("code", """xscale.tl.reconstruct(adata, result.level1)
print({k: v.shape for k, v in adata.layers.items()})"""),
    ("md", """## 7. Fine-tune for a task (parameter-efficient)

The Xpressor (the small module that compresses gene tokens into cell latents) can be
fine-tuned on a labelled task while the rest of the model stays frozen: a small fraction of
the parameters changes. Here: predict cell types, trained on the training slides and scored
on the held-out slide (macro F1 counts rare types as much as common ones)."""),
    ("code", """from xscale.train.finetune import finetune

ft = finetune(
    f"{OUT}/checkpoints/level1/model", adata, task="cell_type", label_key=info.label_key,
    train_mask=~is_held, trainable="xpressor", max_epochs=FINETUNE_EPOCHS, max_steps=MAX_STEPS,
    seed=SEED, progress=False,
)
print(f"trainable parameters: {ft.n_trainable:,} of {ft.n_parameters:,} ({ft.trainable_fraction:.1%})")
print("held-out slide:", {k: round(v, 3) for k, v in ft.metrics.items()})"""),
    ("md", """## 8. The report

`xscale.report.build_report` writes one self-contained HTML file (figures embedded, opens
offline): spatial domains beside the annotation, a map of the latent space, training curves,
xscale against baselines, the metrics table and reconstruction examples."""),
    ("code", """from xscale.report import build_report

metrics = {
    "dataset": info.name, "holdout": HOLDOUT,
    "domains (held-out slide)": {"n_domains": N_DOMAINS,
                                 "xscale_domain": {"ari": ari_xscale},
                                 "pca_spatial_mean": {"ari": baseline["ari"]}},
    "cell types (held-out slide)": {"xscale_label_transfer": {"accuracy": float(acc)},
                                    "xscale_finetuned": {k: v for k, v in ft.metrics.items() if k != "final_loss"}},
}
report = build_report(adata, metrics, f"{OUT}/report.html", history=f"{OUT}/checkpoints",
                      embedding=REPORT_EMBEDDING)
print("open", report.resolve())"""),
    ("md", """## Where next

* `xscale run --data my.h5ad --out DIR` runs the same staged pipeline on your own AnnData or
  SpatialData (`--spatial-key`, `--slide-key`, `--counts-layer`, `--n-domains`).
* `xscale query --store DIR/cells.zarr --level cell --cell ID --k 10` answers queries from the
  command line (JSON or TSV).
* `make demo` runs the full demo at `small` settings and writes `xscale-demo/report.html`."""),
]


def build() -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    for i, (kind, src) in enumerate(CELLS):
        cell = nbformat.v4.new_markdown_cell(src) if kind == "md" else nbformat.v4.new_code_cell(src)
        cell.id = f"cell-{i:02d}"  # stable ids: rebuilding gives the same file
        if kind == "params":
            cell.metadata["tags"] = ["parameters"]
        nb.cells.append(cell)
    return nb


if __name__ == "__main__":
    out = HERE / "tutorial.ipynb"
    nbformat.write(build(), out)
    print(f"wrote {out}")
