"""Level-1 benchmark: do Xpressor cell latents beat PCA, log-normalised expression and
CLS / mean pooling on a held-out slide, and do they decode back to expression?

For each dataset the model never sees the held-out slide. ``xpressor``, ``cls`` and
``mean`` are the same GeneToCell (same encoder, decoder, objectives, steps, batch size,
learning rate and seed); only the bottleneck differs. Each model is trained with every seed of
``SEEDS`` and every score reported is the mean over them (each seed's scores are in the notes:
one seed's held-out macro-F1 moves by ~0.01, as much as the gaps the goals are about, and CPU
training is not bit-reproducible across machines). A logistic regression on
standardised embeddings (``xscale.eval.metrics.probe_scores``) is fitted on the other
slides' cells and scored on the held-out slide. Reconstruction is scored on the
held-out slide: mean per-cell Pearson correlation between the log-normalised decoded
means and the observed log-normalised expression, and the mean NB deviance per entry
against a baseline predicting gene mean (from the training slides) × library size.

Usage::

    python benchmarks/cell_level.py --parallel   # both datasets, seeds 0-2 -> benchmarks/results/cell_level.json
    python benchmarks/cell_level.py --datasets starmap_mpfc --seeds 0 --steps 200 --out /tmp/x.json
    python benchmarks/cell_level.py --merge a.json b.json  # seed means of single-seed runs' files
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from xscale import datasets
from xscale.data.anndata_dataset import counts_matrix, map_panel, vocab_from_adatas
from xscale.eval.metrics import CONVERGED_PROBE, log_normalized, mean_cell_pearson, pca, probe_scores
from xscale.models.gene_to_cell import GeneToCell, GeneToCellConfig
from xscale.models.likelihoods import nb_deviance
from xscale.tl.cells import embed_cells, reconstruct
from xscale.train.level1 import fit_level1
from xscale.utils.atomic import atomic_write_text

log = logging.getLogger("benchmarks.cell_level")
RESULTS = Path(__file__).parent / "results" / "cell_level.json"
POOLINGS = ("xpressor", "cls", "mean")
SEEDS = (0, 1, 2)  # training seeds of the reported run: every score is their mean
# The probe fitted to convergence: with scikit-learn's default tolerance (1e-4) lbfgs stopped early, at a point that
# depends on the machine (the same embedding scored 0.697 here, 0.688 on another machine; 0.691 converged).
PROBE = dict(CONVERGED_PROBE)

# Budget per model and dataset (same for every pooling). Chosen on a tuning split that
# never contains the held-out slide: model and probe fitted on one training slide,
# scored on the other training slide (see NOTES).
# "config": GeneToCellConfig overrides of the preset for that dataset (every pooling).
BUDGET = {"starmap_mpfc": {"steps": 3200, "config": {}},
          "seqfish_embryo_wsir": {"steps": 3200, "config": {"n_latents": 8}}}
NOTES = {
    "tuning_protocol": (
        "Hyper-parameters chosen on a split without the held-out slide (model + probe fitted on the first "
        "training slide, scored on the second). Early debugging runs (before the gene-identity scale fix) "
        "printed held-out scores once; no setting was picked from them. Two settings that won on the tuning "
        "split were also run on the held-out slides and not adopted partly because of those runs (read-out "
        "weight 10: held-out decoding got worse; encoder depth 2: its tuning gain did not carry over; both in"
        " 'tried'), so the held-out slides are not untouched by the choices. PCA(30) is fitted on the "
        "training slides only (seqFISH held-out 0.604); the issue's reference figure 0.625 is PCA fitted on "
        "all cells, held-out embryo included (0.625 measured that way, 2026-11-25), so the issue's seqFISH "
        "bar is 0.645, not the 0.624 computed here from the leak-free PCA."
    ),
    "tried": [
        "tuning split STARmap (fit on slide BZ5, score on BZ9): lognorm 0.697, pca 0.606 macro-F1",
        "dim32/heads2/depth1/K8/context96, batch 64, lr 3e-3, weights 1/0.5/0.5: 0.371 @400 steps, 0.406 @800",
        "same, context 64, batch 32, lr 1e-2: 0.210 @400 (unstable)",
        "same as first, mean pooling, theta init e^2.3: 0.338 @600",
        "same as first, weights 0.2/1/1, theta init e^2.3: 0.428 @600 (kept: defaults now 0.2/1/1, theta e^2)",
        "before fixing the gene-identity scale (LayerNorm on gene embeddings), dim64/depth2 runs reached "
        "0.13-0.50 macro-F1; each step costs ~0.3-1.5 s on the shared 2-core machine (load 10-17)",
        "2026-11-24, tuning split STARmap (model on both training slides, probe fit on BZ5, scored on BZ9; "
        "lognorm 0.697, pca 0.606), 1600 steps, batch 64, lr 3e-3, dim 32: old small preset (K8, context 96) "
        "0.485; + decoder gene-mean offset 0.485; context 192 (all genes) 0.534; + offset 0.523; dim 64 K8 "
        "0.487; K16 0.555; K16 lr 1e-2 batch 128 0.479; K16 auto-encode only 0.560 (decoded-expression probe "
        "0.673, per-gene decoded/observed correlation 0.93: the information is in the latents but not "
        "linearly); K16 auto-encode + denoise 0.554; K32 auto-encode only 0.581; K16 + per-gene standardised "
        "inputs 0.571 (kept: the new small preset); K16 auto-encode only + standardised 0.500. Random ReLU "
        "features of standardised expression (no learning) for scale: 256 dims 0.610, 1024 dims 0.708",
        "2026-11-24 (later), same tuning split, small preset + a contrastive term (two binomially thinned views "
        "(keep 0.5) of each cell, flattened latents -> 2-layer projection (128) -> InfoNCE, temperature 0.2, one "
        "extra encoder pass per view; experiment script outside the package): weight 1 0.593, weight 3 0.580, "
        "vs 0.571 without, at ~1.8x the training time. Not adopted: far from the 0.697 of log-normalised "
        "expression on this split.",
        "2026-11-24 (later), same split, wider latents for the linear probe (random features did better with "
        "more dimensions): small preset with K=64 0.587 (2048 dims), with D=64 / 4 heads / K=16 0.553 (1024 "
        "dims), vs 0.571 (K=16, D=32). Not adopted.",
        "2026-11-24 (third session), same split, a linear read-out term (GeneToCellConfig.w_readout): a bilinear "
        "head predicts "
        "each gene's standardised log-normalised value from the flattened latents, linearly, MSE on the clean "
        "values, added to the NB objectives. STARmap at 1600 steps: weight 0.3 0.616, weight 1 0.687, weight 3 "
        "0.679, weight 1 with K=32 0.691 (1.7x the time), vs 0.571 without; weight 1 at 3200 steps 0.720 "
        "(lognorm 0.697). seqFISH tuning split (model on embryo1 + embryo2, probe fit on embryo1, scored on "
        "embryo2; lognorm 0.461, pca 0.531): with the term 0.551 @1600 / 0.558 @3200 steps, without 0.567 / "
        "0.545 (neutral within noise). Adopted: the small preset has w_readout=1 and the budget is 3200 steps "
        "for both datasets (was 1600).",
        "2026-11-24 (fourth session), the read-out head's start. Its default nn.Linear weights gave a first "
        "squared error of ~135 against z-scores, and at the demo's settings (batch 128, lr 2e-3, ~1800 steps) "
        "the demo decoded its held-out slice at per-gene Pearson 0.47 (0.88 for this benchmark's budget). "
        "Checked without the held-out slide: level 1 trained on BZ5 only at the demo's settings, 1800 steps, "
        "decoded and probed on BZ9 (unseen; probe fit on BZ5), seeds 0 / 1 (/work/exp/ri.py in the session): "
        "default start per-gene Pearson 0.459 / 0.419, probe 0.695 / 0.694; weights and bias zero 0.891 / "
        "0.889, probe 0.680 / 0.665; default weights x 1/sqrt(K*D), bias zero 0.921 / 0.891, probe 0.657 / "
        "0.701. Adopted: the scaled start (GeneToCell.__init__); this benchmark was re-run with it (STARmap "
        "held-out probe 0.686 -> 0.664, deviance 0.144 -> 0.196; seqFISH 0.584 -> 0.577, deviance 0.506 -> 0.434).",
        "2026-11-24 (fourth session, later), with the small start: read-out weight 3 instead of 1. Tuning split "
        "(model on BZ5 + BZ9, probe BZ5 -> BZ9, 3200 steps, seed 0): weight 1 0.694 (0.720 with the default "
        "start), weight 3 0.715. Demo settings, level 1 on BZ5 only, scored on unseen BZ9, seeds 0 / 1: weight 3 "
        "probe 0.680 / 0.706 (weight 1: 0.657 / 0.701; default start 0.695 / 0.694), per-gene Pearson 0.906 / "
        "0.894 (weight 1: 0.921 / 0.891). Adopted: the small preset has w_readout=3; this benchmark was re-run.",
        "Seed spread of the committed STARmap entry (same protocol, Xpressor only, /work/exp/l1.py --split holdout "
        "--steps 3200): seeds 0 / 1 / 2 give held-out macro-F1 0.688 / 0.684 / 0.673 (mean 0.682) and deviance "
        "0.126 / 0.129 / 0.114; the goal (lognorm 0.669 + 0.02 = 0.689) is missed on every seed, not by chance.",
        "2026-11-24 (sixth session), tuning splits of both datasets (model on the two training slides, probe fit on "
        "the first, scored on the second; 3200 steps, seeds 0 / 1): read-out weight 10 vs 3: STARmap 0.722 / 0.736 "
        "(mean 0.729) vs 0.715 / 0.696 (0.706); seqFISH 0.512 / 0.528 (0.520) vs 0.523 / 0.528 (0.526). A full "
        "re-run of this benchmark with weight 10 (seed 0) gave, on the held-out slides: STARmap xpressor 0.6895 "
        "(cls 0.659, mean 0.677), NB deviance 0.182, per-cell Pearson 0.900 (weight 3: 0.6885, 0.126, 0.937); "
        "seqFISH 0.568 (cls 0.593, mean 0.604), deviance 0.501, Pearson 0.561 (weight 3: 0.576, 0.449, 0.615). "
        "Not adopted: the probe moved within seed noise (+0.001 / -0.008) while decoding got worse on both "
        "datasets; the committed entries are the weight-3 run. Also tried, seed 0, tuning splits: 6400 steps at "
        "weight 3 gave STARmap 0.713 (vs 0.715 at 3200) and seqFISH 0.496 (vs 0.523): no gain from a longer budget.",
        "2026-11-24 (sixth session), same tuning splits, 3200 steps, seeds 0 / 1: 8 latents instead of 16 (K·D 256 "
        "instead of 512 dimensions for the probe): seqFISH 0.560 / 0.552 (mean 0.556) vs 0.523 / 0.528 (0.526); "
        "STARmap 0.696 / 0.694 (0.695) vs 0.715 / 0.696 (0.706). Not adopted: STARmap loses 0.011, and level 2 "
        "reads these latents (its settings were chosen with K = 16). The seqFISH gain fits its probe preferring "
        "fewer dimensions (PCA(30) 0.531 vs all 351 log-normalised genes 0.461 on this split); a lead, not a fix.",
        "2026-11-24 (seventh session), seqFISH tuning split, 3200 steps, seeds 0 / 1: its 351 genes are longer "
        "than the small preset's context (192), so each cell was embedded from its expressed genes plus randomly "
        "sampled zeros. Training with context 352 (every gene): 0.547 / 0.548 (2.2x the time); training with 192 "
        "and embedding with every gene: 0.548 / 0.543 (mean 0.545 vs 0.526); 8 latents + embedding with every "
        "gene: 0.565 / 0.553 (mean 0.559; 8 latents alone 0.556); 8 latents trained and embedded with 352: "
        "0.546 (seed 0). Adopted: GeneToCellConfig.inference_max_genes (the small preset reads panels up to 512 "
        "genes whole when embedding / decoding; STARmap's 166 genes were already whole) and, for seqFISH only, "
        "8 latents (BUDGET config). Re-run of seqFISH (held out embryo3): xpressor 0.599 (was 0.576), cls 0.612 "
        "(0.610), mean 0.604 (0.584), deviance 0.481 (0.449), per-cell Pearson 0.574 (0.615). With 16 latents "
        "and the whole-panel embedding (run at the same time, not the chosen setting): xpressor 0.593, "
        "deviance 0.429, Pearson 0.611. The STARmap entry is unchanged (same code path for a 166-gene panel).",
        "2026-11-24 (ninth session), tuning splits, 3200 steps, seeds 0 / 1 (/work/exp/l1.py in the session). "
        "Gene-wise detection augmentation: the denoising objective's binomial thinning with a keep probability "
        "per gene, 0.5 x exp(0.5 N(0, 1)) drawn per gene and batch (capped at 1), so that the latents learn to "
        "ignore slide-to-slide differences in a gene's capture: STARmap 0.708 / 0.678 (mean 0.693 vs 0.706 "
        "without), seqFISH (8 latents) 0.551 / 0.551 (0.551 vs 0.559). 4 latents for seqFISH: 0.564 / 0.562 "
        "(0.563 vs 0.559 with 8, within seed noise). Per-slide standardisation of log-normalised expression, "
        "checked on the baselines first (fit on one training slide, scored on the other): STARmap probe 0.653 "
        "(0.697 without), seqFISH 0.440 (0.461), PCA 0.614 / 0.462 (0.606 / 0.531), so it was not tried as "
        "model input. Width 64 (4 heads; 1024 probe dimensions) on STARmap: 0.704 / 0.701 (0.703 vs 0.706 at "
        "width 32) at ~2.5x the training time. Two Xpressor layers (xpressor_depth 2) on STARmap: 0.724 / 0.685 "
        "(0.705 vs 0.706). Learning rate 1.5e-3 / 6e-3 instead of 3e-3 on STARmap, seed 0: 0.703 / 0.704 (vs "
        "0.715). None adopted.",
        "2026-11-24 (tenth session), STARmap tuning split, 3200 steps, seeds 0 / 1 (/work/exp/l1.py in the "
        "session): an exponential moving average of the level-1 weights (Lightning's EMA callback through "
        "fit_level1's trainer_kwargs, decay 0.995; the averaged weights embed) 0.709 / 0.680 (mean 0.695) vs "
        "0.703 / 0.685 (0.694) without, both on this session's machine. The same command without the average "
        "gave 0.715 / 0.696 on the ninth session's machine: CPU training is not bit-reproducible across "
        "machines, and such differences are as large as the effects compared here. Not adopted.",
        "2026-11-24 (tenth session), tuning splits, 3200 steps, seeds 0 / 1, all on this session's machine "
        "(references without the change: STARmap 0.703 / 0.685, mean 0.694; seqFISH 0.546 / 0.578, mean 0.562). "
        "The Xpressor reading a learned mix of the input tokens and the encoder's output (xpressor_layer_mix, "
        "as PEFT uses): STARmap 0.689 / 0.690 (0.689). Two encoder layers (depth 2 instead of 1): STARmap "
        "0.732 / 0.714 (0.723, +0.029; CLS with depth 2 0.709 / 0.677, 0.693), seqFISH 0.553 / 0.549 (0.551). "
        "The full benchmark for STARmap with depth 2 (seed 0, held-out slide) gave xpressor 0.686, cls 0.668, "
        "mean 0.670 (depth 1, committed: 0.6885 / 0.676 / 0.670), NB deviance 0.145 and per-cell Pearson 0.924 "
        "(0.126 / 0.937), at 370 s of training per model (1.4x the depth-1 runs on the same machine). Not "
        "adopted: the tuning-split gain did not carry to the held-out slide (probe within seed noise, as for "
        "read-out weight 10 above) while decoding got worse and training slower; the committed STARmap entry "
        "stays the depth-1 run.",
        "2026-11-25 (thirteenth session), tuning splits, 3200 steps (/work/exp/l1.py in the session). A larger "
        "share of masked genes in the masked-gene objective (mask_fraction, 0.25 in the small preset; masked "
        "auto-encoders learn better linear-probe features at high mask ratios): STARmap 0.5 -> 0.712 / 0.681 "
        "(seeds 0 / 1, mean 0.697), 0.75 -> 0.713 / 0.697 / 0.674 (seeds 0-2, mean 0.695), vs 0.703 / 0.685 / "
        "0.708 (mean 0.699) without, all on this session's machine; seqFISH (8 latents) 0.75 -> 0.558 / 0.554 "
        "(mean 0.556) vs 0.546 / 0.578 (0.562, tenth session; that session's STARmap references were reproduced "
        "exactly here). Not adopted: no gain beyond seed noise.",
        "2026-11-25 (fourteenth session), tuning splits, 3200 steps (/work/exp/l1.py and /work/exp/l1_slide.py in "
        "the session; references without the change, same machine: STARmap 0.703 / 0.685 / 0.708 (seeds 0-2, mean "
        "0.699), seqFISH 0.546 / 0.578 / 0.550 (mean 0.558)). AdamW weight decay (fit_level1(weight_decay=), 0.01 "
        "by default; seqFISH lost probe accuracy with a longer budget, a sign of over-fitting): 0.1 -> STARmap "
        "0.724 / 0.695 / 0.707 (mean 0.709), seqFISH 0.554 / 0.573 / 0.556 (0.561); 0.3 -> STARmap 0.698 / 0.679 "
        "(seeds 0-1, 0.688), seqFISH 0.611 / 0.557 / 0.559 (0.576, one seed high); 1.0 -> seqFISH 0.546 / 0.532 "
        "(0.539). A slide-conditioned decoder and read-out (a learned offset per slide and gene in the decoder's "
        "gene logits and in the linear read-out, so that the latents need not carry each slide's capture "
        "differences; embedding unchanged), seeds 0-1: STARmap 0.711 / 0.692 (mean 0.701 vs 0.694), seqFISH 0.543 "
        "/ 0.534 (0.539 vs 0.562). Not adopted: no setting gains on both datasets beyond seed noise, and none "
        "would close the held-out gaps (seqFISH needs +0.025 over the committed 0.599 for the baseline goal and "
        "+0.044 for the pooling goal).",
        "2026-11-25 (fifteenth session), tuning splits, 3200 steps (/work/exp/l1_drop.py in the session: "
        "l1.py with dropout patched into every attention output and MLP output of the encoder, Xpressor and "
        "decoder; the model has no dropout). Dropout 0.1: STARmap 0.702 / 0.722 / 0.705 (seeds 0-2, mean "
        "0.710 vs 0.699 without, the fourteenth session's references), seqFISH 0.558 / 0.547 (seeds 0-1, mean "
        "0.552 vs 0.562). CLS pooling on the same STARmap split: 0.701 without dropout (seed 0), 0.692 / "
        "0.682 with it (seeds 0-1): CLS scores as the Xpressor does here, so dropout would not reach the "
        "1.05x pooling goal. Not adopted (within seed noise on STARmap, lower on seqFISH). Also checked, as a "
        "proxy for per-slide input standardisation: log-normalised expression z-scored per slide instead of "
        "over all cells lowers the lognorm probe on both tuning splits (STARmap 0.697 -> 0.653, seqFISH 0.461 "
        "-> 0.440; centring per slide 0.658 / 0.440), so that was not tried in the model.",
        "2026-11-25 (fifteenth session), seqFISH tuning split (model on embryo1 + embryo2, probe fit on "
        "embryo1, scored on embryo2; on this split log-normalised expression scores 0.461 and PCA(30) 0.573, "
        "the same order as on the held-out embryo), 8 latents, 3200 steps, seeds 0 / 1: a lower linear "
        "read-out weight, so that the latents need not reproduce all 351 log-normalised genes linearly (PCA's "
        "30 dimensions beat them): w_readout 1 -> 0.558 / 0.546 (mean 0.552), 0.3 -> 0.567 / 0.560 (0.564), "
        "vs 0.546 / 0.578 (0.562) at the preset's 3. Not adopted: no gain beyond seed noise, and all stay "
        "below PCA on this split.",
        "2026-12-07 (sixteenth session), seqFISH tuning split as above, 8 latents, 3200 steps, seed 0 "
        "(/work/exp/l1_target.py in the session): the linear read-out's target as centred log-normalised "
        "values (each gene minus its mean, not divided by its standard deviation), so that the read-out error"
        " weighs genes by their variance as PCA does (on this split PCA(30) of log-normalised values scores "
        "0.573, PCA(30) of per-gene standardised values 0.537): 0.552 vs 0.566 with the standardised target "
        "on this machine. Seed 1 was stopped to free the CPU. Not adopted.",
        "2026-12-08 (twentieth session), the probe's regularisation (LogisticRegression C, 1 by default), chosen "
        "per embedding by leave-one-training-slide-out cross-validation (fit on one training slide, score on the "
        "other, both ways; C in 0.001..1), the held-out slide scored once with the chosen C (/work/exp/probe_c.py "
        "in the session; STARmap, seed-0 models, default solver tolerance): lognorm C 0.03 -> 0.719 (0.669 at C "
        "1), PCA C 0.3 -> 0.607 (0.613), CLS C 1 -> 0.676, Xpressor C 0.1 -> 0.705 (0.697). Not adopted: a tuned "
        "probe helps log-normalised expression most (+0.050 vs +0.008), so the goals would be further away; the "
        "entries keep the fixed C = 1 of the issue's reference figures.",
        "2026-12-08 (twentieth session), reproducibility. Re-run on this session's machine, seed 0 reproduced the "
        "committed models bit for bit (held-out decoding identical: STARmap NB deviance 0.126069, per-cell "
        "Pearson 0.936632), but the probe did not: STARmap Xpressor 0.697 vs the committed 0.6885, seqFISH 0.601 "
        "vs 0.599, seqFISH lognorm 0.545 vs 0.5445. At scikit-learn's default tolerance (1e-4) lbfgs stopped "
        "after 107 iterations on the STARmap latents, at a point that depends on the machine's floating point; "
        "fitted to convergence (tol 1e-6, 453 iterations) it scores 0.691. Since then every score here is the "
        "converged probe (PROBE) and the mean over training seeds 0-2 (SEEDS); the default-tolerance scores are "
        "kept per seed (macro_f1_default_tol).",
    ],
}


def _split(name: str):
    info = datasets.info(name)
    adata = datasets.load(name)
    if info.drop_labels:
        adata = adata[~adata.obs[info.label_key].isin(info.drop_labels)].copy()
    test = (adata.obs[info.slide_key].astype(str) == info.holdout).to_numpy()
    if not test.any():
        raise RuntimeError(f"held-out slide {info.holdout!r} not found in {name}")
    return info, adata, test


class _Baseline(NamedTuple):
    """The held-out counts on the model's genes and the gene-mean baseline scored on them (same for every pooling)."""

    cols: np.ndarray  # (G,) held-out columns of the model's genes
    x: np.ndarray  # (n, G) held-out counts
    theta: torch.Tensor  # (1, G) per-gene NB theta both means are scored with
    deviance: float  # NB deviance per count of the baseline


def _baseline(model: GeneToCell, train_ad, test_ad) -> _Baseline:
    cols = map_panel(list(map(str, test_ad.var_names)), model.vocab).columns
    x = counts_matrix(test_ad)[:, cols].toarray().astype(np.float64)  # (n, G)
    # Baseline: gene share from the training slides × library. Deviance depends on theta, so both
    # means are scored with the same per-gene theta (moments on the training cells around the baseline).
    xt = counts_matrix(train_ad)[:, cols].toarray().astype(np.float64)
    share = xt.sum(0) / xt.sum()
    mt = share[None] * xt.sum(1, keepdims=True)
    excess = ((xt - mt) ** 2 - mt).sum(0)
    theta_b = torch.from_numpy(np.clip((mt**2).sum(0) / np.maximum(excess, 1e-8), 1e-2, 1e4))[None]
    mb = share[None] * x.sum(1)[:, None]
    dev_b = nb_deviance(torch.from_numpy(x), torch.from_numpy(mb), theta_b).mean().item()
    return _Baseline(cols, x, theta_b, float(dev_b))


def _reconstruction(model: GeneToCell, train_ad, test_ad, baseline: _Baseline | None = None) -> dict[str, float]:
    """Decoding of the held-out slide; ``baseline`` from :func:`_baseline` when already computed (else it is)."""
    base = _baseline(model, train_ad, test_ad) if baseline is None else baseline
    out = reconstruct(test_ad, model, copy=True)
    x = base.x
    mu = out.layers["xscale_expected"][:, base.cols].astype(np.float64)
    lib = x.sum(1)
    lx = np.log1p(x / np.maximum(lib[:, None], 1e-8) * 1e4)
    lm = np.log1p(mu / np.maximum(mu.sum(1, keepdims=True), 1e-8) * 1e4)
    pear = mean_cell_pearson(lx, lm)
    dev = nb_deviance(torch.from_numpy(x), torch.from_numpy(mu), base.theta).mean().item()
    return {"pearson": float(pear), "nb_deviance": float(dev), "baseline_nb_deviance": base.deviance}


def run_dataset(name: str, *, steps: int, batch_size: int, lr: float, preset: str, seed: int,
                work: Path, overrides: dict | None = None) -> tuple[dict, dict]:
    info, adata, test = _split(name)
    y = adata.obs[info.label_key].astype(str).to_numpy()
    train_ad, test_ad = adata[~test].copy(), adata[test].copy()
    f1, acc, extra = {}, {}, {}

    X = log_normalized(adata.X)
    P_tr, P_te = pca(X[~test], [X[test]], n_components=30, seed=seed)
    default_tol = {}  # the same probes at scikit-learn's default tolerance (how the earlier entries were scored)
    for kind, (tr, te) in {"lognorm": (X[~test], X[test]), "pca": (P_tr, P_te)}.items():
        r = probe_scores(tr, y[~test], te, y[test], **PROBE)
        f1[kind], acc[kind] = r["macro_f1"], r["accuracy"]
        default_tol[kind] = probe_scores(tr, y[~test], te, y[test])["macro_f1"]
    log.info("%s baselines: %s", name, f1)

    genes = vocab_from_adatas([adata]).genes
    recon, seconds, baseline = None, {}, None
    for pooling in POOLINGS:
        config = GeneToCellConfig.preset(preset, genes=genes, **{**(overrides or {}), "pooling": pooling})
        t0 = time.perf_counter()
        model = fit_level1(train_ad, config, out_dir=work / f"{name}_{pooling}", max_steps=steps,
                           batch_size=batch_size, lr=lr, seed=seed, val_fraction=0.0, logger="none",
                           enable_progress_bar=False, accelerator="cpu", checkpoint_every_n_steps=10_000)
        seconds[pooling] = time.perf_counter() - t0
        emb = embed_cells(adata, model, copy=True).obsm["X_xscale_cell"]
        r = probe_scores(emb[~test], y[~test], emb[test], y[test], **PROBE)
        f1[pooling], acc[pooling] = r["macro_f1"], r["accuracy"]
        default_tol[pooling] = probe_scores(emb[~test], y[~test], emb[test], y[test])["macro_f1"]
        log.info("%s %s: %s (%.0f s)", name, pooling, r, seconds[pooling])
        # decoding through each bottleneck (the entry's "reconstruction" is the Xpressor's)
        if baseline is None:  # the same genes for every pooling: computed once
            baseline = _baseline(model, train_ad, test_ad)
        per_pooling = extra.setdefault("reconstruction_per_pooling", {})
        per_pooling[pooling] = _reconstruction(model, train_ad, test_ad, baseline)
        if pooling == "xpressor":
            recon = per_pooling[pooling]
            extra["config"] = {k: v for k, v in json.loads(json.dumps(config.__dict__)).items() if k != "genes"}
    entry = {
        "holdout": info.holdout,
        "macro_f1": {k: f1[k] for k in (*POOLINGS, "pca", "lognorm")},
        "accuracy": {k: acc[k] for k in (*POOLINGS, "pca", "lognorm")},
        "reconstruction": recon,
        "train_seconds": seconds["xpressor"],
    }
    extra["train_seconds_per_pooling"] = seconds
    extra["probe"] = dict(PROBE)
    extra["macro_f1_default_tol"] = default_tol
    extra["budget"] = {"steps": steps, "batch_size": batch_size, "lr": lr, "preset": preset, "seed": seed,
                       "n_train_cells": int((~test).sum()), "n_test_cells": int(test.sum())}
    extra["goals"] = _goals(f1, recon)
    return entry, extra


def _run_parallel(args: argparse.Namespace, argv: list[str]) -> int:
    """One process per (dataset, seed), at most ``--jobs`` at a time (each its own CPU share); their
    single-seed JSON is merged into ``args.out`` (seed means, see :func:`merge_seeds`)."""
    import subprocess
    import sys

    base = [a for a in (argv or sys.argv[1:]) if a != "--parallel"]
    for option in ("--seeds", "--datasets", "--out", "--jobs"):  # each child gets its own
        base = _drop_option(base, option)
    with tempfile.TemporaryDirectory(prefix="xscale_cell_level_par_") as tmp:
        jobs = [(name, seed, Path(tmp) / f"{name}_{seed}.json") for name in args.datasets for seed in args.seeds]
        running: list[subprocess.Popen] = []
        codes = []
        for name, seed, out in jobs:
            while len(running) >= args.jobs:
                codes.append(running.pop(0).wait())
            cmd = [sys.executable, __file__, *base, "--datasets", name, "--seeds", str(seed), "--out", str(out)]
            running.append(subprocess.Popen(cmd))
        codes += [p.wait() for p in running]
        if any(codes):
            raise RuntimeError(f"a dataset run failed (exit codes {codes})")
        result, notes = merge_files([out for *_, out in jobs])
    _write(args, result, notes)
    return 0


def merge_seeds(parts: list[tuple[dict, dict]]) -> tuple[dict, dict]:
    """One dataset's entry and notes from single-seed runs ``[(entry, extra), ...]``.

    The entry's scores are the means over seeds (the goals are judged on them); every seed's
    own scores and goals stay in the notes (``macro_f1_per_seed``, ``goals_per_seed``, ...).
    """
    if not parts:
        raise ValueError("merge_seeds: no runs to merge")
    seeds = [extra["budget"]["seed"] for _, extra in parts]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"merge_seeds: seed repeated among the runs: {seeds}")
    holdouts = {entry["holdout"] for entry, _ in parts}
    if len(holdouts) != 1:
        raise ValueError(f"merge_seeds: runs of different held-out slides: {sorted(holdouts)}")

    def mean_of(dicts: list[dict]) -> dict:
        return {k: float(np.mean([d[k] for d in dicts])) for k in dicts[0]}

    entries = [e for e, _ in parts]
    extras = [x for _, x in parts]
    entry = {
        "holdout": entries[0]["holdout"],
        "macro_f1": mean_of([e["macro_f1"] for e in entries]),
        "accuracy": mean_of([e["accuracy"] for e in entries]),
        "reconstruction": mean_of([e["reconstruction"] for e in entries]),
        "train_seconds": float(np.mean([e["train_seconds"] for e in entries])),
    }
    extra = {k: v for k, v in extras[0].items() if k not in ("goals", "budget")}
    extra["reconstruction_per_pooling"] = {
        pooling: mean_of([x["reconstruction_per_pooling"][pooling] for x in extras])
        for pooling in extras[0]["reconstruction_per_pooling"]}
    extra["train_seconds_per_pooling"] = mean_of([x["train_seconds_per_pooling"] for x in extras])
    extra["budget"] = {**{k: v for k, v in extras[0]["budget"].items() if k != "seed"}, "seeds": seeds}
    extra["macro_f1_per_seed"] = {k: [e["macro_f1"][k] for e in entries] for k in entries[0]["macro_f1"]}
    extra["macro_f1_sd"] = {k: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
                            for k, v in extra["macro_f1_per_seed"].items()}
    extra["nb_deviance_per_seed"] = [e["reconstruction"]["nb_deviance"] for e in entries]
    extra["goals_per_seed"] = [x["goals"] for x in extras]
    if all("macro_f1_default_tol" in x for x in extras):  # the same probes at scikit-learn's default tolerance
        extra["macro_f1_default_tol"] = {k: [x["macro_f1_default_tol"][k] for x in extras]
                                         for k in extras[0]["macro_f1_default_tol"]}
    extra["goals"] = _goals(entry["macro_f1"], entry["reconstruction"])
    return entry, extra


def merge_files(paths: list[Path]) -> tuple[dict, dict]:
    """Results and notes merged from single-seed output files (each one or more datasets)."""
    by_dataset: dict[str, list[tuple[dict, dict]]] = {}
    notes: dict = {}
    for path in paths:
        part = json.loads(Path(path).read_text())
        part_notes = part.pop("notes")
        for name, entry in part.items():
            extra = part_notes.get(name)
            if extra is None or "seed" not in extra.get("budget", {}):
                raise ValueError(f"{path}: entry {name!r} is not a single-seed run (budget.seed missing); "
                                 "merge the files each run wrote, not a merged result")
            by_dataset.setdefault(name, []).append((entry, extra))
        notes.update({k: v for k, v in part_notes.items() if k not in part})
    result = {}
    for name, parts in by_dataset.items():
        parts = sorted(parts, key=lambda p: p[1]["budget"]["seed"])
        # one seed: its own entry, still mergeable with other seeds' files later
        result[name], notes[name] = parts[0] if len(parts) == 1 else merge_seeds(parts)
    return result, notes


def _goals(f1: dict, recon: dict) -> dict:
    best_base = max(f1["pca"], f1["lognorm"])
    best_pool = max(f1["cls"], f1["mean"])
    return {
        "xpressor_vs_best_baseline_plus_0.02": f1["xpressor"] >= best_base + 0.02,
        "xpressor_vs_1.05x_best_pooling": f1["xpressor"] >= 1.05 * best_pool,
        "deviance_below_baseline": recon["nb_deviance"] < recon["baseline_nb_deviance"],
    }


def _write(args: argparse.Namespace, result: dict, notes: dict) -> None:
    """Write --out; with --update, keep the entries (and notes) of datasets not run this time."""
    if args.update and args.out.exists():
        previous = json.loads(args.out.read_text())
        old_notes = previous.pop("notes", {})
        result = {**previous, **result}
        notes = {**old_notes, **notes}
    result["notes"] = notes
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=2))
    log.info("wrote %s", args.out)


def _drop_option(argv: list[str], option: str) -> list[str]:
    """argv without ``option`` and the values following it (up to the next ``--flag``)."""
    out, skip = [], False
    for a in argv:
        if a == option:
            skip = True
            continue
        if skip and a.startswith("--"):
            skip = False
        if not skip:
            out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", nargs="+", default=list(BUDGET))
    ap.add_argument("--steps", type=int, default=None, help="override the per-dataset step budget")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--config", default="{}",
                    help="JSON GeneToCellConfig overrides on top of the per-dataset ones, e.g. '{\"n_latents\": 16}'")
    ap.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS),
                    help="training seeds; every score is the mean over them (default %(default)s)")
    ap.add_argument("--threads", type=int, default=1)  # >1 thrashes on a loaded 2-core machine
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--parallel", action="store_true",
                    help="one process per dataset and seed (at most --jobs at a time), merged at the end")
    ap.add_argument("--jobs", type=int, default=2, help="processes at a time with --parallel")
    ap.add_argument("--update", action="store_true",
                    help="merge into an existing --out JSON (keep the other datasets' entries)")
    ap.add_argument("--merge", nargs="+", type=Path, metavar="JSON",
                    help="only merge single-seed result files (written by earlier runs) into --out")
    args = ap.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds):
        ap.error(f"--seeds: each seed once (got {args.seeds})")
    if args.jobs < 1:
        ap.error(f"--jobs: expected a positive number of processes, got {args.jobs}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.merge:
        result, notes = merge_files(args.merge)
        _write(args, result, {**notes, **NOTES})  # this file's NOTES, not the runs' copies
        return 0
    if args.parallel and len(args.datasets) * len(args.seeds) > 1:
        return _run_parallel(args, argv or [])
    for noisy in ("lightning", "lightning.pytorch", "xscale.data.anndata_dataset"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    result: dict = {}
    notes = dict(NOTES)
    with tempfile.TemporaryDirectory(prefix="xscale_cell_level_") as tmp:
        for name in args.datasets:
            steps = args.steps if args.steps is not None else BUDGET[name]["steps"]
            overrides = {**BUDGET[name]["config"], **json.loads(args.config)}
            parts = []
            for seed in args.seeds:
                entry, extra = run_dataset(name, steps=steps, batch_size=args.batch_size, lr=args.lr,
                                           preset=args.preset, seed=seed, work=Path(tmp) / str(seed),
                                           overrides=overrides)
                extra["settings"] = {"preset": args.preset, "config_overrides": overrides, "steps": steps}
                parts.append((entry, extra))
            # one seed: its own entry (mergeable later with --merge); several: their means
            result[name], notes[name] = parts[0] if len(parts) == 1 else merge_seeds(parts)
    _write(args, result, notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
