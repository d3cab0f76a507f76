"""Parameter-efficient fine-tuning of the Xpressor: transfer, cross-platform labels, slide correction.

1. Pretrain one level-1 model self-supervised on every bundled dataset except
   merfish_lung_tessera (a shared vocabulary over panels of 166-960 genes).
2. MERFISH lung lineages, split spatially (train on the left half of the field, score
   on the right half): macro-F1 of a linear probe on the pretrained latents, of PEFT
   (Xpressor + linear head trained, everything else frozen), of full fine-tuning and of
   the same model trained from scratch (all with the same budget).
3. Cross-platform label transfer CosMx lung -> MERFISH lung over their shared genes
   (CosMx types mapped to the MERFISH lineages): probe vs PEFT, plus a logistic
   regression on log-normalised shared-gene expression as a baseline.
4. Slide correction (PEFT, adversarial slide classifier + reconstruction) on STARmap's
   3 slices and seqFISH's 3 embryos: slide mixing (entropy of slide labels among 15
   nearest neighbours, normalised) and cell-type kNN purity, before and after.

Writes benchmarks/results/peft.json. About 15 minutes on 2 CPU cores (``--quick``: ~2).
Run: ``python benchmarks/peft.py [--quick] [--out PATH]``.
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("benchmarks.peft")

PRETRAIN = ["starmap_mpfc", "seqfish_embryo_wsir", "cosmx_nsclc_profast", "pbmc3k_subset_profast"]
# CosMx NSCLC cell types -> the MERFISH lung lineages.
COSMX_TO_LINEAGE = {
    "endothelial": "Vascular", "fibroblast": "Fibroblast", "epithelial": "Epithelial", "tumor 5": "Epithelial",
    "tumor 9": "Epithelial", "tumor 12": "Epithelial", "plasmablast": "Plasma", "mast": "Mast",
    "macrophage": "Myeloid", "monocyte": "Myeloid", "neutrophil": "Myeloid", "mDC": "Myeloid", "pDC": "Myeloid",
    "B-cell": "Lymphocyte", "NK": "Lymphocyte", "Treg": "Lymphocyte", "T CD4 naive": "Lymphocyte",
    "T CD4 memory": "Lymphocyte", "T CD8 naive": "Lymphocyte", "T CD8 memory": "Lymphocyte",
}


def flat(z: np.ndarray) -> np.ndarray:
    return z.reshape(len(z), -1)


def pretrain(adatas, workdir: Path, *, steps: int, seed: int):
    from xscale.data.anndata_dataset import vocab_from_adatas
    from xscale.models.gene_to_cell import GeneToCellConfig
    from xscale.train.level1 import fit_level1

    # A deep, narrow encoder under a one-layer Xpressor: the shape where training only the Xpressor pays.
    config = GeneToCellConfig.preset("tiny", genes=vocab_from_adatas(adatas).genes, depth=8, max_genes=64,
                                     w_denoise=0.0)
    t = time.time()
    model = fit_level1(adatas, config, out_dir=workdir, max_steps=steps, batch_size=64, lr=2e-3,
                       seed=seed, val_fraction=0.02, logger="none", enable_progress_bar=False,
                       checkpoint_every_n_steps=10_000)
    return model, time.time() - t


def clone(model):
    from xscale.models.gene_to_cell import GeneToCell

    copy = GeneToCell(model.config)
    copy.load_state_dict(model.state_dict())
    return copy


def transfer_merfish(model, merfish, *, epochs: int, seed: int) -> dict:
    from xscale.eval.metrics import log_normalized, pca, probe_scores
    from xscale.models.gene_to_cell import GeneToCell
    from xscale.train.finetune import encode_cells, finetune

    x = merfish.obsm["spatial"][:, 0]
    train = x < np.median(x)
    y = merfish.obs["cell_type"].astype(str).to_numpy()
    out: dict = {"n_train": int(train.sum()), "n_test": int((~train).sum()), "split": "spatial: x < median(x) trains"}
    Z = flat(encode_cells(model, merfish))
    f1 = {"linear_probe": probe_scores(Z[train], y[train], Z[~train], y[~train])["macro_f1"]}
    common = dict(task="cell_type", label_key="cell_type", train_mask=train, max_epochs=epochs, batch_size=64,
                  head_hidden=0, seed=seed, progress=False)
    seconds = {}
    for name, trainable, start, lr in [("peft_xpressor", "xpressor", model, 2e-3), ("full_finetune", "all", model, 1e-3)]:
        t = time.time()
        res = finetune(clone(start), merfish, trainable=trainable, lr=lr, **common)
        f1[name], seconds[name] = res.metrics["macro_f1"], time.time() - t
        if trainable == "xpressor":
            out["trainable_fraction"] = res.trainable_fraction
        else:
            out["full_finetune_trainable_fraction"] = res.trainable_fraction
    torch.manual_seed(seed)
    t = time.time()
    res = finetune(GeneToCell(model.config), merfish, trainable="all", lr=1e-3, **common)
    f1["from_scratch"], seconds["from_scratch"] = res.metrics["macro_f1"], time.time() - t
    X = log_normalized(merfish.X)
    P_train, P_test = pca(X[train], [X[~train]], n_components=30)
    out["macro_f1"] = f1
    out["baselines"] = {"expression_pca30_probe": probe_scores(P_train, y[train], P_test, y[~train])["macro_f1"]}
    out["seconds"] = seconds
    return out


def cross_platform(model, cosmx, merfish, *, epochs: int, seed: int) -> dict:
    from xscale.eval.metrics import log_normalized, probe_scores
    from xscale.train.finetune import encode_cells, finetune, predict_labels

    shared = sorted(set(map(str.upper, cosmx.var_names)) & set(map(str.upper, merfish.var_names)))
    c = cosmx[:, [g.upper() in shared for g in cosmx.var_names]].copy()
    m = merfish[:, [g.upper() in shared for g in merfish.var_names]].copy()
    c.obs["lineage"] = c.obs["cell_type"].astype(str).map(COSMX_TO_LINEAGE)
    yc, ym = c.obs["lineage"].astype(str).to_numpy(), m.obs["cell_type"].astype(str).to_numpy()
    res = {"n_shared_genes": len(shared), "label_map": COSMX_TO_LINEAGE}
    Zc, Zm = flat(encode_cells(model, c)), flat(encode_cells(model, m))
    f1 = {"linear_probe": probe_scores(Zc, yc, Zm, ym)["macro_f1"]}
    ft = finetune(clone(model), c, task="cell_type", label_key="lineage", trainable="xpressor", max_epochs=epochs,
                  batch_size=64, lr=2e-3, head_hidden=0, seed=seed, progress=False)
    pred = predict_labels(ft.model, ft.head, m)
    from sklearn.metrics import f1_score

    f1["peft_xpressor"] = float(f1_score(ym, pred, average="macro"))
    # Same genes, same order, for the expression baseline.
    order = {g.upper(): i for i, g in enumerate(m.var_names)}
    cols = [order[g.upper()] for g in c.var_names]
    Xc, Xm = log_normalized(c.X), log_normalized(m.X)[:, cols]
    f1["expression_probe"] = probe_scores(Xc, yc, Xm, ym)["macro_f1"]
    res["macro_f1"] = f1
    return res


def correction(model, adata, *, slide_key: str, drop: tuple[str, ...], epochs: int, seed: int, weight: float,
               n_train: int) -> dict:
    from xscale.eval.metrics import knn_purity, slide_mixing
    from xscale.train.finetune import encode_cells, finetune

    keep = ~adata.obs["cell_type"].astype(str).isin(drop).to_numpy()
    slides, labels = adata.obs[slide_key].astype(str).to_numpy(), adata.obs["cell_type"].astype(str).to_numpy()

    def scores(m) -> dict:
        Z = flat(encode_cells(m, adata))
        return {"slide_mixing": slide_mixing(Z, slides, k=15), "knn_purity": knn_purity(Z[keep], labels[keep], k=15)}

    before = scores(model)
    t = time.time()
    # Train on a random subset (CPU budget); score every cell.
    train = np.zeros(adata.n_obs, dtype=bool)
    train[np.random.default_rng(seed).choice(adata.n_obs, min(n_train, adata.n_obs), replace=False)] = True
    res = finetune(clone(model), adata, task="batch_correction", slide_key=slide_key, trainable="xpressor", train_mask=train,
                   correction="adversarial", correction_weight=weight, max_epochs=epochs, batch_size=64, lr=1e-3,
                   seed=seed, progress=False)
    after = scores(res.model)
    return {"n_cells": adata.n_obs, "n_train": int(train.sum()), "slides": sorted(set(slides)), "before": before, "after": after,
            "mixing_gain": after["slide_mixing"] - before["slide_mixing"],
            "purity_drop": before["knn_purity"] - after["knn_purity"], "correction_weight": weight,
            "trainable_fraction": res.trainable_fraction, "seconds": time.time() - t}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a ~2-minute smoke run (numbers not meaningful)")
    p.add_argument("--pretrain-steps", type=int, default=150)
    p.add_argument("--epochs", type=int, default=4, help="fine-tuning epochs of every classification method")
    p.add_argument("--correction-epochs", type=int, default=2, help="fine-tuning epochs of slide correction")
    p.add_argument("--correction-weight", type=float, default=0.3)
    p.add_argument("--correction-cells", type=int, default=1200, help="cells per dataset the correction trains on")
    p.add_argument("--pretrained", help="run directory: pretrain into it, or reuse the model already there")
    p.add_argument("--sections", nargs="+", default=["transfer", "cross_platform", "correction"],
                   choices=["transfer", "cross_platform", "correction"], help="which parts to run (default all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "peft.json"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("lightning", "lightning.pytorch", "xscale.data.anndata_dataset"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    import xscale.datasets as xd

    t0 = time.time()
    rng = np.random.default_rng(args.seed)
    steps, epochs, c_epochs = (20, 1, 1) if args.quick else (args.pretrain_steps, args.epochs, args.correction_epochs)
    n_corr = 200 if args.quick else args.correction_cells
    data = {n: xd.load(n) for n in PRETRAIN + ["merfish_lung_tessera"]}
    seqfish = data["seqfish_embryo_wsir"]
    seqfish_sub = seqfish[np.sort(rng.choice(seqfish.n_obs, 800 if args.quick else 2000, replace=False))].copy()
    merfish = data["merfish_lung_tessera"]
    if args.pretrained and (Path(args.pretrained) / "model" / "config.json").exists():
        from xscale.models.io import load_model

        model, pre_s = load_model(Path(args.pretrained) / "model"), float("nan")
        log.info("reusing the pretrained model in %s", args.pretrained)
    elif args.pretrained:
        model, pre_s = pretrain([data[n] for n in PRETRAIN], Path(args.pretrained), steps=steps, seed=args.seed)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            model, pre_s = pretrain([data[n] for n in PRETRAIN], Path(tmp), steps=steps, seed=args.seed)
    log.info("pretrained %d steps in %.0f s", steps, pre_s)
    result: dict = {
        "pretrain": {"datasets": PRETRAIN, "steps": steps, "batch_size": 64, "seconds": pre_s,
                     "vocabulary": model.config.n_genes,
                     "config": {k: getattr(model.config, k) for k in ("dim", "depth", "n_latents", "xpressor_depth",
                                                                      "decoder_depth", "max_genes")}},
        "finetune_epochs": epochs, "correction_epochs": c_epochs,
        "learning_rates": {"peft_xpressor": 2e-3, "full_finetune": 1e-3, "from_scratch": 1e-3, "correction": 1e-3},
    }
    out = Path(args.out)

    def save() -> None:  # after every section, so a crash late in the run keeps what was measured
        result["seconds_total"] = time.time() - t0
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp_out = out.with_name(out.name + ".tmp")
        tmp_out.write_text(json.dumps(result, indent=2, default=float))
        tmp_out.replace(out)

    result["quick"] = args.quick
    result["torch_threads"] = args.threads
    if "transfer" in args.sections:
        tr = transfer_merfish(model, merfish, epochs=epochs, seed=args.seed)
        log.info("MERFISH transfer: %s", tr["macro_f1"])
        result["trainable_fraction"] = tr.pop("trainable_fraction")
        result["macro_f1"] = tr.pop("macro_f1")
        result["merfish_transfer"] = tr
        save()
    if "cross_platform" in args.sections:
        result["cross_platform_cosmx_to_merfish"] = cross_platform(
            model, data["cosmx_nsclc_profast"], merfish, epochs=epochs, seed=args.seed)
        log.info("cross-platform: %s", result["cross_platform_cosmx_to_merfish"]["macro_f1"])
        save()
    if "correction" not in args.sections:
        return 0
    result["batch_correction"] = {
        "starmap_mpfc": correction(model, data["starmap_mpfc"], slide_key="slice", drop=(), epochs=c_epochs,
                                   seed=args.seed, weight=args.correction_weight,
                                   n_train=n_corr),
        "seqfish_embryo_wsir": correction(model, seqfish_sub, slide_key="embryo", drop=("Low quality",),
                                          epochs=c_epochs, seed=args.seed, weight=args.correction_weight,
                                   n_train=n_corr),
    }
    log.info("batch correction: %s", {k: (v["mixing_gain"], v["purity_drop"]) for k, v in result["batch_correction"].items()})
    save()
    if "macro_f1" not in result:
        return 0
    f1 = result["macro_f1"]
    bc = result["batch_correction"].values()
    result["goals"] = {
        "trainable_fraction<=0.10": result["trainable_fraction"] <= 0.10,
        "peft>=linear_probe": f1["peft_xpressor"] >= f1["linear_probe"],
        "peft_within_0.02_of_full": f1["peft_xpressor"] >= f1["full_finetune"] - 0.02,
        "mixing_improves": all(v["mixing_gain"] > 0 for v in bc),
        "purity_drop<0.02": all(v["purity_drop"] < 0.02 for v in bc),
    }
    save()
    log.info("wrote %s in %.0f s; goals %s", out, result["seconds_total"], result["goals"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
