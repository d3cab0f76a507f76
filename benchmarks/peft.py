"""Parameter-efficient fine-tuning of the Xpressor: transfer, cross-platform labels, slide correction.

1. Pretrain one level-1 model self-supervised on every bundled dataset except
   merfish_lung_tessera (a shared vocabulary over panels of 166-960 genes), 2500 steps.
2. MERFISH lung lineages, split spatially (train on the left half of the field, score
   on the right half): macro-F1 of a linear probe on the pretrained latents, of PEFT
   (Xpressor + linear head trained, everything else frozen), of full fine-tuning and of
   the same architecture trained from scratch. lr / head / epochs of each method are chosen
   on a validation split of the TRAINING half (its left part fits, its right part scores);
   the chosen setting then trains on the whole training half with several seeds and the
   test half is scored once per seed (mean reported). Diagnostics (validation split only):
   probes on frozen input tokens, encoder tokens, pretrained and random-init latents,
   expression PCA, and the panel's overlap with the pretraining vocabulary.
3. Cross-platform label transfer CosMx lung -> MERFISH lung over their shared genes
   (CosMx types mapped to the MERFISH lineages): probe vs PEFT, plus a logistic
   regression on log-normalised shared-gene expression as a baseline.
4. Slide correction (PEFT: adversarial slide classifier or MMD, plus reconstruction) on
   STARmap's 3 slices and seqFISH's 3 embryos: slide mixing (entropy of slide labels among
   15 nearest neighbours, normalised) and cell-type kNN purity, before and after. Method,
   weight and epochs are chosen on STARmap (train on a random subset, score the other
   cells); seqFISH takes no part in the choice.

Writes benchmarks/results/peft.json. The committed result came from (one core each; the two section
runs in parallel took 21 and 9 minutes)::

    python benchmarks/peft.py --pretrained /tmp/peft7_pre --sections none --threads 1   # pretrain, ~4 min
    python benchmarks/peft.py --pretrained /tmp/peft7_pre --sections transfer cross_platform --threads 1 \
        --out /tmp/peft7_A.json &
    python benchmarks/peft.py --pretrained /tmp/peft7_pre --sections correction --threads 1 --out /tmp/peft7_B2.json
    python benchmarks/peft.py --merge /tmp/peft7_A.json /tmp/peft7_B2.json

``--quick``: a ~3-minute smoke run (20 pretraining steps; numbers not meaningful).
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from xscale.utils.atomic import atomic_write_text

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


COMMAND = ("2026-11-25 (twelfth session): the pretrained model /tmp/peft12_pre was made by pretrain() with "
           "PRETRAIN_CONFIG as now (w_readout=1; /work/exp/pre_variant.py in the session called it with that override "
           "before the config changed, 265 s); python benchmarks/peft.py --pretrained /tmp/peft12_pre --sections "
           "transfer cross_platform --threads 1 --out /tmp/peft12_tr.json and, in parallel, python benchmarks/peft.py "
           "--pretrained /tmp/peft12_pre --sections correction --threads 1 --out /tmp/peft12_corr.json (the rule "
           "without CORRECTION_MIN_SPREAD); then, with it, python benchmarks/peft.py --pretrained /tmp/peft12_pre "
           "--sections correction --threads 2 --out /tmp/peft12_corr2.json; python benchmarks/peft.py --merge "
           "/tmp/peft12_tr.json /tmp/peft12_corr2.json")
NOTES = [
    "Pretraining: 2500 steps (was 150), batch 64, lr 2e-3, config = 'tiny' preset with PRETRAIN_CONFIG overrides "
    "(depth 8, K=8 latents, one Xpressor layer, context 64 genes, per-gene standardised inputs, decoder gene offset, "
    "no denoising objective). Val loss 2.151 (step 615) -> 2.058 (1539) -> 2.048 (2155): flattening.",
    "Tried before the final run (validation split of the MERFISH training half, never the test half): a variant "
    "without standardize_values (2500 steps) gave pretrained-latent probe macro-F1 0.439 vs 0.415 with it "
    "(within noise; kept the standardised model the fine-tuning grid was explored on). Setting the input "
    "standardisation statistics from MERFISH instead of the pretraining data lowered the probe to 0.315 (dropped).",
    "Dev tuning rounds on the same validation split: PEFT lr 2e-3 / 5e-3 / 1e-2 / 2e-2 at 30 epochs gave 0.520 / "
    "0.548 / 0.590 / 0.379 (2e-2 diverges; still rising at 30 epochs for 1e-2, hence PEFT epochs up to 80); "
    "full fine-tuning lr 3e-4 peaked at 0.576 (dropped from the final grid), 1e-3 and 3e-3 peaked at 5-20 epochs.",
    "Slide correction dev round (STARmap tuning split): adversarial weight 0.3 or 1.0 for 2 epochs, the previous "
    "setting, moved mixing by <= 0.002 (the old result); weight 3 / MMD for 6 epochs moved it by 0.02-0.03 with "
    "purity unchanged or higher, hence the final grid (adversarial 3/10, MMD 1/5, 6/12 epochs).",
    "A first final correction run (one training subset per candidate and per dataset) chose adversarial weight 3 "
    "for 12 epochs (STARmap tuning gain 0.054, purity drop 0.005), but on another STARmap subset the same setting "
    "gave gain 0.017 (purity +0.006; seqFISH: gain 0.005, purity drop 0.014): adversarial training varies a lot "
    "between runs, so candidates are now compared on the mean of --correction-repeats subsets/seeds and the "
    "final corrections are means over as many runs.",
    "Test macro-F1 of each fine-tuning method is the mean over --final-seeds seeds of the chosen setting; the "
    "test half (x >= median) is only scored by these final runs.",
    "Cross-platform PEFT uses the lr / epochs chosen for PEFT on the MERFISH validation split.",
    "Why PEFT still trails full fine-tuning (merfish_transfer.diagnostics, validation split only): the frozen "
    "features carry little of what MERFISH lineages need. A probe on the pretrained latents (0.415) is barely "
    "above one on the latents of the same architecture with random weights (0.403), and far below PCA(30) of "
    "expression (0.670; 0.655 on the vocabulary genes alone, so the missing genes cost little). Only 314 of the "
    "479 MERFISH genes are in the pretraining vocabulary (about 36 of 49 expressed genes per cell), none of the "
    "pretraining panels is lung MERFISH, and from-scratch training matches or beats full fine-tuning, i.e. this "
    "pretraining does not transfer to this panel; full fine-tuning can re-learn the gene and value embeddings, "
    "the Xpressor on frozen tokens cannot. On the validation split PEFT (0.630) and full fine-tuning (0.627) were "
    "level, but see the last note: that validation tie came from a spike at the chosen epoch.",
    "Macro-F1 is noisy here: Mast cells are 2 of the fitting cells, 1 validation cell and 3 test cells, and each "
    "class weighs 1/7 of macro-F1, so one Mast cell moves a score by up to ~0.1 (e.g. from-scratch with a hidden "
    "layer reached 0.765 on validation at 5 epochs, 0.61 at 20).",
    "2026-11-24 (later), same pretrained model and validation split, the chosen PEFT setting (lr 1e-2) trained "
    "longer: validation macro-F1 0.559 / 0.630 / 0.574 / 0.569 / 0.577 at 40 / 80 / 120 / 160 / 200 epochs "
    "(75 s, one thread). The 0.630 at 80 epochs that made PEFT look level with full fine-tuning on validation "
    "is a spike; PEFT plateaus near 0.57-0.58, as on the test half (0.579). Longer PEFT does not close the gap.",
    "2026-11-24 (third session), validation split only: pretraining with the level-1 linear read-out term "
    "(PRETRAIN_CONFIG + w_readout=1, 2500 steps, 222 s) raised the probe on the pretrained latents from 0.415 to "
    "0.518, but full fine-tuning gained more than PEFT: at the chosen settings (PEFT lr 1e-2, epochs 20/40/60/80; "
    "full lr 3e-3, epochs 5/10/20), seeds 0 and 1, PEFT 0.622/0.629/0.581/0.589 and 0.605/0.589/0.597/0.605 vs "
    "full 0.642/0.702/0.666 and 0.735/0.656/0.657 (without the term: PEFT 0.563/0.559/0.579/0.630 and "
    "0.575/0.550/0.580/0.582, full 0.627/0.599/0.602 and 0.578/0.612/0.616). The gap the goal is about widens "
    "(~0.03 -> ~0.07), so PRETRAIN_CONFIG keeps w_readout=0 (the tiny preset's default).",
    "2026-11-24 (sixth session), validation split only: PEFT with more latent queries than were pretrained "
    "(32 instead of 8; the 24 new queries copies of the pretrained ones plus noise, head on all 32; lr 1e-2, "
    "seeds 0 / 1) scored 0.540 / 0.503 at 20 epochs, 0.568 / 0.569 at 40, 0.564 / 0.587 at 80, vs 0.563 / "
    "0.575, 0.559 / 0.550 and 0.630 / 0.582 with the 8 pretrained queries (same script), at 12.6 % trainable "
    "(over the 10 % cap). Not adopted.",
    "2026-11-24 (seventh session), validation split only, lr 1e-2, val macro-F1 at 10/20/40/60/80 epochs. "
    "The Xpressor reads a learned softmax mix of the frozen encoder's input tokens and its 8 layer outputs "
    "(finetune(layer_mix=True): 9 extra trainable weights, 9.80 % trainable): uniform start, seed 0 "
    "0.549/0.582/0.618/0.606/0.627, seed 1 0.557/0.564/0.671/0.607/0.646, vs the last layer only "
    "0.505/0.563/0.559/0.579/0.630 and 0.523/0.575/0.550/0.580/0.582. The mix moved towards the shallow "
    "states (seed 0: input 0.20, layers 1-8 0.18/0.14/0.13/0.09/0.05/0.06/0.07/0.08), as the diagnostics "
    "suggest (the deep layers carry little of the MERFISH lineages). Starting on the last layer (logit 4) "
    "stayed there (0.86) and scored 0.505/0.544/0.530/0.541/0.537; starting on the input tokens 0.528/"
    "0.558/0.573/0.569/0.568. Adopted: TUNE_GRID's PEFT candidates now include layer_mix=True (chosen on "
    "this split like every other setting). Also tried: embedding every vocabulary gene of the panel (314) "
    "instead of the pretraining context (64) when scoring: seed 0 0.501/0.567/0.589/0.555/0.612, seed 1 "
    "0.490/0.524/0.527/0.561/0.549 (worse: the model never saw that many zeros); training at context 128 as "
    "well 0.430/0.500/0.542/0.585/0.535. Not adopted (PRETRAIN_CONFIG keeps inference_max_genes unset). "
    "A per-channel mix ((9, 32) weights, softmax over depths per channel): seed 0 best 0.596, seed 1 0.554 "
    "(worse than the scalar mix). Re-run of the transfer and cross-platform sections with the new grid (same "
    "pretrained model): the layer mix was chosen (val 0.625 at 60 epochs vs 0.603 without), test PEFT 0.595 "
    "(was 0.579) vs full fine-tuning 0.627; cross-platform PEFT (same chosen setting) 0.445 (was 0.479).",
    "2026-11-24 (eighth session). Every tuning run now also keeps an exponential moving average of its "
    "weights (finetune(ema_decay=0.98), Lightning's EMA callback) and is scored with both weights at each "
    "listed epoch; each candidate's score is the mean over 2 tuning seeds (--tune-seeds), where one seed's "
    "curve jumped by up to 0.06 between neighbouring epochs. Dev runs on the validation split (lr 1e-2, layer "
    "mix, val macro-F1 at 40/60/80 epochs, seeds 0 / 1, current and averaged weights of the same run): "
    "current 0.607/0.609/0.620 and 0.594/0.617/0.599; decay 0.98 0.622/0.616/0.638 and 0.608/0.611/0.605; "
    "decay 0.995 0.607/0.616/0.627 and 0.598/0.609/0.611 (0.98 kept). Full fine-tuning gained as much (seed 0, "
    "lr 3e-3, 5/10/20/40 epochs: current 0.627/0.599/0.602/0.619, averaged 0.542/0.636/0.628/0.629). Not "
    "adopted, same split and seeds, averaged weights at 40/60/80: lr 2e-2 (<= 0.597); counts thinned "
    "binomially to a per-cell share drawn from U(0.5, 1) as augmentation 0.619/0.616/0.640 and 0.597/0.618/"
    "0.609 (no gain); weight decay 0.05 instead of 1e-4 0.593/0.589/0.596 and 0.603/0.611/0.605 (worse); "
    "pretraining with the layer mix on (PRETRAIN_CONFIG + xpressor_layer_mix, 2500 steps; the mix stayed "
    "near uniform, 0.09-0.14 per depth) 0.597/0.606/0.611 and 0.621/0.617/0.616 (no gain). Final run: the "
    "averaged weights were chosen for every method (PEFT lr 1e-2, layer mix, 80 epochs, val 0.612; full "
    "fine-tuning lr 3e-3, 40 epochs, val 0.635); test PEFT 0.605 (was 0.595) vs full fine-tuning 0.636 (was "
    "0.627), from scratch 0.641, probe 0.450: both rose by about 0.01, the gap is unchanged (0.031). "
    "Cross-platform PEFT 0.440 (was 0.445). Afterwards, longer PEFT with the average (lr 1e-2, layer mix, "
    "seeds 0 / 1, validation split): 0.638 / 0.605 at 80 epochs, 0.634 / 0.600 at 100, 0.629 / 0.619 at 120, "
    "0.630 / 0.613 at 160 (means 0.622, 0.617, 0.624, 0.622): flat after 80, so the grid's cap stays 80. Also not "
    "adopted (same "
    "setting, averaged weights at 40/60/80, seeds 0 / 1): label smoothing 0.1 on the weighted cross-entropy "
    "0.365/0.367/0.372 and 0.346/0.350/0.380 (collapses); dropout 0.2 on the linear head's input "
    "0.590/0.617/0.605 and 0.610/0.601/0.604 (no gain); unweighted cross-entropy (balance_classes=False) "
    "0.634/0.616/0.618 and 0.605/0.599/0.600 (no gain).",
    "2026-11-24 (ninth session), same split, pretrained model and setting (lr 1e-2, layer mix, averaged weights "
    "at 40/60/80 epochs, seeds 0 / 1; reference 0.622/0.616/0.638 and 0.608/0.611/0.605, mean 0.617), /work/exp/"
    "peft_ema2.py in the session. Not adopted: the model's NB reconstruction kept as an auxiliary loss during "
    "cell-type PEFT (finetune(reconstruction_weight=)), weight 0.3 0.597/0.602/0.595 and 0.605/0.602/0.606, "
    "weight 1 0.596/0.600/0.592 and 0.597/0.594/0.589 (worse); a cosine learning-rate decay over the 80 epochs "
    "after a 5 % warm-up 0.612/0.608/0.606 and 0.587/0.588/0.585 (worse); the head at 3x the Xpressor's "
    "learning rate 0.572/0.559/0.547 and 0.612/0.610/0.613 (worse on average); batch 32 0.591/0.575/0.586 and "
    "0.610/0.613/0.619, batch 128 0.607/0.606/0.591 and 0.594/0.593/0.579 (both worse than 64); the "
    "encoder's per-gene input standardisation re-estimated on the MERFISH fitting cells before PEFT (statistics, "
    "not trained parameters) 0.549/0.553/0.552 and 0.550/0.547/0.547 (worse, as for the probe above); the "
    "layer-mix weights at 10x the learning rate 0.600/0.596/0.588 and 0.608/0.609/0.611 (worse; the mix became "
    "spiky, e.g. 0.31 on layer 6 for seed 0, 0.38 on the input tokens for seed 1).",
    "2026-11-24 (tenth session). The pretrained model was pretrained again on this session's machine (same "
    "command and seed; CPU training is not bit-reproducible across machines: validation loss 2.058 vs 2.048 at "
    "step 2155), and every section was re-run with it. The earlier chosen PEFT setting (lr 1e-2, layer mix, "
    "averaged weights) scored lower on the validation split with the new model: mean over 40/60/80 epochs, "
    "seeds 0-4, 0.583 (per seed 0.571/0.574/0.605/0.587/0.577; 0.617 with the earlier model, seeds 0/1). "
    "Training cells binomially thinned at every step, keep ~ U(0.5, 1) per cell (/work/exp/peft_aug.py in the "
    "session), gave 0.617 (0.620/0.611/0.622/0.623/0.609: higher on every seed); seeds 0/1 only: keep ~ U(0.3, 1) "
    "0.619, each measured gene zeroed with probability 0.2 0.620, both together 0.544, zeroed with probability "
    "0.4 0.582 (seed 0). Full fine-tuning (lr 3e-3, averaged weights, 10/20/40 epochs, seeds 0/1) with thinning "
    "0.650 vs 0.662 without, but steadier (0.643-0.658 vs 0.623-0.727). Adopted: finetune(thinning=), "
    "xscale finetune --thinning; TUNE_GRID offers every candidate of every method with and without it "
    "(THINNING). This run chose it for PEFT (validation 0.636) and not for full fine-tuning (0.678) or "
    "training from scratch. Test half, 3 seeds: PEFT 0.611 (0.631/0.606/0.597), full 0.634 (0.624/0.642/0.637): "
    "the gap is 0.023 (0.031 in the earlier run), still above the 0.02 of the goal. The slide correction "
    "(chosen on STARmap as before: MMD, weight 1, 6 epochs) now drops seqFISH's cell-type purity by 0.0215 "
    "(repeats 0.033 and 0.010; mixing gain 0.020 and -0.001), above the 0.02 of the goal; with the earlier "
    "model it dropped 0.005. Both repeats of each candidate and dataset are in batch_correction.",
    "2026-11-25 (eleventh session), slide correction only (same pretrained model; transfer and cross-platform "
    "sections unchanged). Two findings. (1) An MMD correction can collapse the latents: MMD weight 5 for 12 "
    "epochs shrank their spread (mean per-feature std over training cells) from 0.40 to 0.0008, with "
    "reconstruction worse (NB loss 3.1 -> 3.7) and slides separated further (mixing gain -0.68); MMD weight 1 for 12 "
    "epochs collapsed in 2 of 3 repeats. finetune now measures the spread before and after every slide correction, "
    "records it (metrics latent_spread_before / _after) and warns below 0.1x; this benchmark records it per run "
    "(latent_spread, collapsed) with the decoded expression's per-cell Pearson (reconstruction_pearson), and a "
    "candidate that collapsed in any repeat is not eligible. (2) finetune(structure_weight=) adds "
    "heads.structure_loss: each slide's cells centred on the slide's mean, the change of their pairwise inner "
    "products relative to the pretrained model's (a frozen copy), over the reference's mean squared norm, squared. "
    "Whole slides may shift or rotate; each slide's own geometry, spread included, is kept. A first version "
    "compared cosines of the centred latents instead; on STARmap it looked better (MMD 1, 6 epochs, structure 0.3: "
    "gain 0.032, purity +0.005, chosen), but cosines ignore the scale, and on seqFISH that setting collapsed the "
    "latents in all 3 repeats (spread 0.40 -> < 0.03, decoded-expression Pearson 0.370 -> 0.283) while its kNN "
    "scores looked fine (gain 0.009, purity +0.005): it was replaced by the inner-product version before any "
    "further choice. Rule change, made before this final run: no purity drop at all on STARmap "
    "(CORRECTION_MAX_DROP = 0; the 0.01 allowance became 0.0215 on seqFISH in the tenth session) and no collapse; "
    "3 repeats per candidate instead of 2. Chosen: MMD weight 1, 6 epochs, structure 1 (STARmap tuning gain 0.019, "
    "purity +0.001). Final (3 training subsets each): STARmap gain 0.017, purity drop 0.0005; seqFISH gain 0.012, "
    "purity drop 0.007 (repeats 0.008 / 0.006 / 0.007), no collapse, decoded-expression Pearson 0.370 -> 0.368 "
    "(STARmap 0.470 -> 0.468). The purity goal is met on both; the mixing gains are about half the adversarial "
    "ones (0.04-0.05 on STARmap), which lose 0.011-0.027 of purity there.",
    "2026-11-25 (twelfth session), validation split only, same pretrained model, the chosen PEFT setting (lr 1e-2, "
    "layer mix, thinning 0.5, averaged weights; /work/exp/peft_reinit.py in the session): (1) trained longer, seeds "
    "0 / 1, 0.636 / 0.609 at 80 epochs, 0.643 / 0.611 at 120, 0.635 / 0.612 at 160, 0.632 / 0.602 at 240: a "
    "plateau. (2) The pretrained Xpressor replaced by a freshly initialised one (same shape, same trainable "
    "fraction), mean over 40/60/80 epochs, seeds 0-5: 0.618 (0.624/0.622/0.622/0.599/0.631/0.609) vs 0.617 with "
    "the pretrained Xpressor (0.620/0.611/0.622/0.623/0.609/0.615). What the pretrained Xpressor learned does not "
    "matter here: PEFT's score is set by the frozen embedders and encoder, which full fine-tuning re-learns.",
    "2026-11-25 (twelfth session), what the pretraining gives the frozen encoder. Validation split only, the current "
    "recipes (PEFT: lr 1e-2, layer mix, thinning 0.5, averaged weights, mean over 40/60/80 epochs; full fine-tuning: "
    "lr 3e-3, averaged weights, mean over 10/20/40 epochs), seeds 0-2 each, /work/exp/run_pv.sh in the session: "
    "PRETRAIN_CONFIG as it was (w_readout 0) PEFT 0.615 (0.616/0.612/0.616), full 0.654 (0.662/0.662/0.639), gap "
    "0.040; with the level-1 linear read-out term (w_readout 1, as the small preset has it at 3) PEFT 0.657 "
    "(0.652/0.663/0.657), full 0.673 (0.679/0.674/0.666), gap 0.016; a 4-layer encoder PEFT 0.635, full 0.653, "
    "but 13.3 % trainable (over the 10 % cap; not eligible). In the third session the read-out term had widened the "
    "gap, before PEFT had the layer mix, thinning and averaged weights. Adopted: PRETRAIN_CONFIG w_readout=1. "
    "Final run with it (test half, 3 seeds): PEFT 0.648 (0.657/0.612/0.676) vs full fine-tuning 0.651 "
    "(0.668/0.645/0.641), gap 0.003; linear probe 0.576 (was 0.416); from scratch 0.648; 9.32 % trainable; "
    "cross-platform PEFT 0.515 (was 0.523; probe 0.475, expression 0.461). Before (w_readout 0, tenth session): "
    "PEFT 0.611, full 0.634, probe 0.416, gap 0.023. Slide correction with this model: the first run, under the "
    "rule fixed in the eleventh session, chose MMD 5 / 6 epochs / structure 3 (STARmap tuning gain 0.062, purity "
    "+0.003) and gave STARmap gain 0.069, purity drop -0.002, but seqFISH gain 0.037, purity drop 0.072 (repeats "
    "0.063 / 0.087 / 0.066): that candidate had shrunk the latents' spread to 0.36-0.38x on STARmap, a partial "
    "collapse the 0.1x rule lets through. CORRECTION_MIN_SPREAD = 0.5 was added after that run (so seqFISH is no "
    "longer untouched by the choice of rule) and the section re-run: chosen MMD 1 / 12 epochs / structure 0 "
    "(tuning gain 0.038, purity +0.001, spread >= 0.79x); STARmap gain 0.040, purity drop 0.000; seqFISH gain 0.034, "
    "purity drop 0.037 (0.035 / 0.038 / 0.038): the < 0.02 goal is not met on seqFISH with this pretrained model. "
    "This model's latents separate seqFISH's cell types better before any correction (kNN purity 0.518) and lose "
    "more of it to MMD. The library's default correction stays MMD 1 / structure 1 (chosen with the earlier model).",
    "2026-11-25 (thirteenth session), two attempts at the seqFISH purity goal, both on the same pretrained model "
    "(/tmp/peft12_pre), neither adopted; the committed correction entries are the twelfth session's. (1) A "
    "mutual-nearest-neighbour correction (finetune(correction='mnn') in a patch not merged): anchor pairs between "
    "slides in the pretrained latents, their squared distance pulled down. With a fixed scale it shrank the "
    "latents (spread 0.28-0.55x) and the anchors moved apart relative to other cells; as a scale-free ratio (pair "
    "distance over the batch's mean pairwise distance) it widened them instead (1.5-1.9x). STARmap tuning protocol, "
    "1 repeat: gains 0.015-0.035 with purity drops 0.010-0.034 at every weight, k and structure weight tried, "
    "against MMD 1's 0.034 / -0.005. Why: in these latents only 41 % (STARmap) / 52 % (seqFISH) of mutual-neighbour "
    "pairs between slides share a cell type (k=5; 37 % / 45 % at k=20), about the kNN purity of the space (0.385 / "
    "0.493), so the anchors join different types as often as a neighbour does. (2) A per-dataset choice without "
    "cell-type labels: finetune now records neighbourhood_preservation (the share of each training cell's 15 "
    "nearest neighbours within its slide kept by the correction, on up to 512 training cells; label-free). The rule, "
    "fixed before the run: on each dataset, the largest mixing gain among candidates that did not collapse, kept "
    ">= 0.5 of their spread and >= 0.5 of those neighbours in every repeat (0.5 set on STARmap's labelled runs). "
    "python benchmarks/peft.py --pretrained /tmp/peft12_pre --sections correction --threads 1 with that rule (28 "
    "min): STARmap chose MMD 1 / 12 epochs / structure 0 as before (gain 0.040, purity drop 0.000); seqFISH chose "
    "MMD 5 / 12 epochs / structure 3 (kept 0.555 of its neighbours) and lost 0.100 of purity (gain 0.045). On "
    "seqFISH, keeping neighbourhoods does not keep purity: candidates keeping 0.51-0.68 lost 0.07-0.12. And on "
    "seqFISH's tuning cells (800 not trained on) every candidate of the grid with a mixing gain above 0.011 lost "
    "more than 0.02 of purity (MMD 1 / 12 epochs / structure 3: gain 0.010, drop 0.016; structure 0: gain 0.029, "
    "drop 0.046): with this pretrained model the goal is out of reach of the grid's corrections, whichever rule "
    "picks among them. Every candidate that kept less than 0.5 of its neighbours lost purity on both datasets "
    "(0.012-0.22), so finetune warns below 0.5; keeping more is no guarantee. The rule was reverted; tuning runs "
    "now record min_preservation (not used by the choice).",
    "2026-12-07 (seventeenth session), where seqFISH's purity drop comes from; none adopted, the committed entries "
    "are the twelfth session's. The pretrained model re-made as committed (2500 steps, 308 s). seqFISH's "
    "2000-cell subset, tuning protocol (train on 1200 random cells, score the other 800; 2 repeats with subsets "
    "100 / 101 and seeds 0 / 1; /work/exp/{cond,rec0,wmmd,posthoc,clusters}.py in the session). (1) Reconstruction "
    "alone (correction weight 0) moves nothing: 12 epochs gain 0.002 / -0.001, drop 0.001 / -0.002. MMD 1 for 3 "
    "epochs: gain 0.019 / 0.022, drop 0.021 / 0.026; for 12 epochs (the committed choice): gain 0.033 / 0.031, "
    "drop 0.040 / 0.039; with structure 1: gain 0.019 / 0.017, drop 0.034 / 0.033. The drop comes from the MMD "
    "itself and grows with the gain (about 1.1-1.2x it). (2) A slide-conditioned decoder during the correction "
    "(a learned offset per slide and gene on the decoder's logits and on the read-out, so the reconstruction "
    "need not keep slide differences in the latents): MMD 1 / 12 epochs gain 0.033 / 0.032, drop 0.042 / 0.040: no "
    "effect. (3) Why: the embryos differ in composition, not only by batch (forebrain/midbrain/hindbrain 16.5 / "
    "31.8 / 10.0 % of embryo1 / 2 / 3, spinal cord 15.2 / 6.3 / 2.4 %, lateral plate mesoderm 6.2 / 0 / 2.1 %), so "
    "matching whole distributions moves cells onto other types. Centring each slide's pretrained latents lowers "
    "mixing (0.811 -> 0.597) and purity (0.508 -> 0.493): the slide means differ by composition. (4) A "
    "composition-weighted MMD (each slide's cells weighted by pooled / slide share of their k-means cluster in the "
    "pretrained latents, fitted on the training cells, capped at 10): k=10 gain 0.020 / 0.033, drop 0.033 / 0.040; "
    "k=20 gain 0.024 / 0.024, drop 0.031 / 0.023 -- a weaker correction on the same gain-for-purity line, because "
    "clusters of these latents match cell types poorly (ARI 0.11 at k=10, 0.20 at k=20); MMD 5 collapsed the "
    "latents with or without weights (spread < 0.004x). Weights from k-means (k=20) of PCA(30) of standardised "
    "log-normalised expression (ARI 0.36 with the cell types): gain 0.021 / 0.025, drop 0.035 / 0.017. Even weights "
    "from the true cell types (a diagnostic that uses the labels): gain 0.025 / 0.022, drop 0.028 / 0.016 (mean "
    "0.024 / 0.022). Composition explains only part of the drop: an MMD in these latents (kNN purity 0.51) also "
    "pairs cells of different types within matching populations, so a label-free correction would need latents "
    "that separate seqFISH's cell types better before it.",
]


def flat(z: np.ndarray) -> np.ndarray:
    return z.reshape(len(z), -1)


PRETRAIN_CONFIG = dict(dim=32, heads=2, depth=8, n_latents=8, xpressor_depth=1, decoder_depth=1, max_genes=64,
                       w_denoise=0.0, standardize_values=True, decoder_gene_bias=True, w_readout=1.0)


def pretrain(adatas, workdir: Path, *, steps: int, seed: int):
    """Self-supervised level-1 pretraining into ``workdir`` (model in workdir/model, seconds in
    workdir/pretrain.json)."""
    from xscale.data.anndata_dataset import vocab_from_adatas
    from xscale.models.gene_to_cell import GeneToCellConfig
    from xscale.train.level1 import fit_level1

    # A deep, narrow encoder under a one-layer Xpressor: the shape where training only the Xpressor pays.
    # Every field that differs from the "tiny" preset is spelled out in PRETRAIN_CONFIG.
    config = GeneToCellConfig.preset("tiny", genes=vocab_from_adatas(adatas).genes, **PRETRAIN_CONFIG)
    t = time.time()
    model = fit_level1(adatas, config, out_dir=workdir, max_steps=steps, batch_size=64, lr=2e-3,
                       seed=seed, val_fraction=0.02, logger="csv", enable_progress_bar=False,
                       checkpoint_every_n_steps=500)
    seconds = time.time() - t
    (workdir / "pretrain.json").write_text(json.dumps({"steps": steps, "seconds": seconds, "seed": seed,
                                                       "batch_size": 64, "lr": 2e-3}))
    return model, seconds


def clone(model):
    from xscale.models.gene_to_cell import GeneToCell

    copy = GeneToCell(model.config)
    copy.load_state_dict(model.state_dict())
    return copy


# Fine-tuning candidates per method, chosen on a validation split of the TRAINING half only. Every run
# trains max(SCORE_EPOCHS[method]) epochs at a constant learning rate and is scored after each listed
# epoch, which equals separate runs of that many epochs (the RNG is restored after each scoring).
# PEFT keeps a linear head: a hidden layer would push the trainable fraction above 10 %. A PEFT epoch
# costs about half a full fine-tuning epoch (no backward pass through the encoder), so PEFT's 80
# epochs cost about what full fine-tuning's 40 do; full fine-tuning peaked at 5-10 epochs in every
# candidate (see merfish_transfer.tuning.runs), so its cap does not bind.
# thinning: training cells binomially thinned at every step, keep ~ U(thinning, 1) per cell
# (finetune(thinning=)); every method gets each candidate with and without it.
THINNING = (None, 0.5)
TUNE_GRID = {
    # layer_mix: the Xpressor reads a learned mix of all encoder depths (finetune(layer_mix=True))
    "peft_xpressor": [dict(lr=lr, head_hidden=0, layer_mix=mix, thinning=t)
                      for t in THINNING for mix in (False, True) for lr in (5e-3, 1e-2)],
    "full_finetune": [dict(lr=lr, head_hidden=h, thinning=t)
                      for t in THINNING for lr, h in ((1e-3, 0), (1e-3, 128), (3e-3, 0))],
}
TUNE_GRID["from_scratch"] = TUNE_GRID["full_finetune"]  # same candidates and budget as full fine-tuning
# Every tuning run keeps an exponential moving average of its weights (finetune(ema_decay=)) and is scored
# with both its current and its averaged weights at each listed epoch (the average does not change the
# trajectory): each candidate enters the choice twice, ema_decay None and EMA_DECAY, for every method.
EMA_DECAY = 0.98
SCORE_EPOCHS = {"peft_xpressor": (10, 20, 40, 60, 80), "full_finetune": (5, 10, 20, 40),
                "from_scratch": (5, 10, 20, 40)}


class EpochScores:
    """Lightning callback factory: macro-F1 on ``val`` cells after chosen epochs (head calibrated on ``fit``).

    ``scores`` are those of the current weights; with an :class:`~xscale.train.optim.EMAWeights`
    among the trainer's callbacks, ``scores_ema`` are those of its averaged weights at the same
    epochs (the average never changes the trajectory, so one run gives both).
    """

    def __new__(cls, adata, fit: np.ndarray, val: np.ndarray, label_key: str, epochs: tuple[int, ...]):
        import lightning as L
        from sklearn.metrics import f1_score

        from xscale.train.finetune import calibrate_head, encode_cells, predict_labels
        from xscale.train.optim import EMAWeights

        fit_data, val_data = adata[fit].copy(), adata[val].copy()
        truth = val_data.obs[label_key].astype(str).to_numpy()

        def score(module) -> float:
            head = copy.deepcopy(module.head)
            calibrate_head(head, encode_cells(module.model, fit_data))
            pred = predict_labels(module.model, head, val_data)
            module.model.train()
            return float(f1_score(truth, pred, average="macro"))

        class _Scores(L.Callback):
            def __init__(self) -> None:
                self.scores: dict[int, float] = {}
                self.scores_ema: dict[int, float] = {}

            def on_train_epoch_end(self, trainer, module) -> None:
                e = trainer.current_epoch + 1
                if e not in epochs:
                    return
                state = torch.get_rng_state()  # scoring must not change the next epochs' shuffling
                self.scores[e] = score(module)
                ema = next((c for c in trainer.callbacks if isinstance(c, EMAWeights)), None)
                if ema is not None:
                    with ema.applied(module):
                        self.scores_ema[e] = score(module)
                torch.set_rng_state(state)

        return _Scores()


def scratch_like(model):
    """A freshly initialised GeneToCell of the same config; only the input standardisation statistics
    (data statistics, not weights) are copied so both start from the same preprocessing."""
    from xscale.models.gene_to_cell import GeneToCell

    fresh = GeneToCell(model.config)
    if model.config.standardize_values:
        fresh.value_mean.copy_(model.value_mean)
        fresh.value_std.copy_(model.value_std)
    return fresh


def _start(model, method: str):
    return scratch_like(model) if method == "from_scratch" else clone(model)


def tune_transfer(model, merfish, train: np.ndarray, *, seed: int, epochs: dict[str, tuple[int, ...]],
                  tune_seeds: int = 1) -> dict:
    """Choose lr / head / epochs per method on a spatial split of the training half (left half fits);
    a candidate's score at an epoch is its mean over ``tune_seeds`` runs (seeds seed, seed + 1, ...)."""
    from xscale.train.finetune import finetune

    x = merfish.obsm["spatial"][:, 0]
    sub = merfish[train].copy()
    xs = x[train]
    fit = xs < np.median(xs)
    out: dict = {"split": "training half split again at the median x: left part fits, right part validates",
                 "n_fit": int(fit.sum()), "n_val": int((~fit).sum()), "score_epochs": epochs,
                 "tune_seeds": list(range(seed, seed + tune_seeds)), "runs": {}, "chosen": {}}
    for method, grid in TUNE_GRID.items():
        runs = []
        for cand in grid:
            per_seed: dict = {None: [], EMA_DECAY: []}
            t = time.time()
            for s in range(seed, seed + tune_seeds):
                torch.manual_seed(s)
                cb = EpochScores(sub, fit, ~fit, "cell_type", epochs[method])
                finetune(_start(model, method), sub, task="cell_type", label_key="cell_type", train_mask=fit,
                         trainable="xpressor" if method == "peft_xpressor" else "all", max_epochs=max(epochs[method]),
                         batch_size=64, seed=s, progress=False, callbacks=[cb], ema_decay=EMA_DECAY, **cand)
                per_seed[None].append(cb.scores)
                per_seed[EMA_DECAY].append(cb.scores_ema)
            seconds = time.time() - t
            for decay, scores in per_seed.items():
                mean = {str(e): float(np.mean([sc[e] for sc in scores])) for e in epochs[method]}
                runs.append({**cand, "ema_decay": decay, "val_macro_f1": mean,
                             "val_macro_f1_per_seed": [{str(e): f for e, f in sc.items()} for sc in scores],
                             "seconds": seconds})
                log.info("tune %s %s ema_decay=%s: %s", method, cand, decay, mean)
        best = max(((r, int(e)) for r in runs for e in r["val_macro_f1"]),
                   key=lambda re: (round(re[0]["val_macro_f1"][str(re[1])], 4), -re[1]))
        r, e = best
        out["runs"][method] = runs
        out["chosen"][method] = {"lr": r["lr"], "head_hidden": r["head_hidden"], "epochs": e,
                                 "layer_mix": r.get("layer_mix", False), "ema_decay": r["ema_decay"],
                                 "thinning": r.get("thinning"), "val_macro_f1": r["val_macro_f1"][str(e)]}
    return out


def diagnostics(model, merfish, train: np.ndarray) -> dict:
    """Why PEFT may trail full fine-tuning, measured on the validation split of the training half only.

    Linear probes (fit on the left part of the training half, scored on its right part) on: the
    frozen input tokens (mean over a cell's genes), the frozen encoder's output tokens (mean),
    the pretrained latents, and PCA(30) of log-normalised expression over all / vocabulary genes;
    plus the overlap of the MERFISH panel with the pretraining vocabulary.
    """
    from functools import partial

    from torch.utils.data import DataLoader

    from xscale.data.anndata_dataset import AnnDataCellDataset
    from xscale.data.batch import collate_cells
    from xscale.eval.metrics import log_normalized, pca, probe_scores
    from xscale.train.finetune import encode_cells

    sub = merfish[train].copy()
    xs = merfish.obsm["spatial"][train, 0]
    fit = xs < np.median(xs)
    y = sub.obs["cell_type"].astype(str).to_numpy()
    in_vocab = model.vocab.index(list(sub.var_names)) >= 0
    loader = DataLoader(AnnDataCellDataset(sub, model.vocab), batch_size=256,
                        collate_fn=partial(collate_cells, max_genes=model.config.max_genes,
                                           rng=np.random.default_rng(0)))
    inputs, hidden = [], []
    model.eval()
    with torch.no_grad():
        for b in loader:
            keep = (~b.pad_mask).float()[..., None]  # (B, G, 1)
            tok = model._tokens(b.gene_ids, b.values, None)  # (B, G, D)
            h = model.encoder(tok, b.pad_mask)  # (B, G, D)
            inputs.append(((tok * keep).sum(1) / keep.sum(1)).numpy())
            hidden.append(((h * keep).sum(1) / keep.sum(1)).numpy())
    X = log_normalized(sub.X)
    P_fit, P_val = pca(X[fit], [X[~fit]], n_components=30)
    V_fit, V_val = pca(X[fit][:, in_vocab], [X[~fit][:, in_vocab]], n_components=30)

    def probe(Z_fit, Z_val) -> float:
        return probe_scores(Z_fit, y[fit], Z_val, y[~fit])["macro_f1"]

    Z = flat(encode_cells(model, sub))
    torch.manual_seed(0)
    R = flat(encode_cells(scratch_like(model), sub))  # same architecture and input statistics, random weights
    Inp, H = np.concatenate(inputs), np.concatenate(hidden)
    nnz = (sub.X > 0)
    return {
        "split": "validation split of the training half (never the test half)",
        "val_probe_macro_f1": {
            "input_token_mean": probe(Inp[fit], Inp[~fit]), "encoder_token_mean": probe(H[fit], H[~fit]),
            "pretrained_latents": probe(Z[fit], Z[~fit]), "random_init_latents": probe(R[fit], R[~fit]),
            "expression_pca30_all_genes": probe(P_fit, P_val),
            "expression_pca30_vocabulary_genes": probe(V_fit, V_val)},
        "panel_genes": int(sub.n_vars), "panel_genes_in_vocabulary": int(in_vocab.sum()),
        "expressed_genes_per_cell": float(nnz.sum(1).mean()),
        "expressed_vocabulary_genes_per_cell": float(nnz[:, in_vocab].sum(1).mean()),
    }


def transfer_merfish(model, merfish, *, seed: int, seeds: int, score_epochs: dict[str, tuple[int, ...]],
                     tune_seeds: int = 1) -> dict:
    from xscale.eval.metrics import log_normalized, pca, probe_scores
    from xscale.train.finetune import encode_cells, finetune

    x = merfish.obsm["spatial"][:, 0]
    train = x < np.median(x)
    y = merfish.obs["cell_type"].astype(str).to_numpy()
    out: dict = {"n_train": int(train.sum()), "n_test": int((~train).sum()), "split": "spatial: x < median(x) trains"}
    t = time.time()
    out["tuning"] = tune_transfer(model, merfish, train, seed=seed, epochs=score_epochs, tune_seeds=tune_seeds)
    out["tuning"]["seconds"] = time.time() - t
    out["diagnostics"] = diagnostics(model, merfish, train)
    Z = flat(encode_cells(model, merfish))
    f1 = {"linear_probe": probe_scores(Z[train], y[train], Z[~train], y[~train])["macro_f1"]}
    per_seed: dict = {}
    seconds = {}
    for method, chosen in out["tuning"]["chosen"].items():
        scores = []
        t = time.time()
        for s in range(seed, seed + seeds):
            torch.manual_seed(s)
            res = finetune(_start(model, method), merfish, task="cell_type", label_key="cell_type", train_mask=train,
                           trainable="xpressor" if method == "peft_xpressor" else "all", max_epochs=chosen["epochs"],
                           batch_size=64, lr=chosen["lr"], head_hidden=chosen["head_hidden"], seed=s, progress=False,
                           layer_mix=chosen.get("layer_mix", False), ema_decay=chosen.get("ema_decay"),
                           thinning=chosen.get("thinning"))
            scores.append(res.metrics["macro_f1"])
            if method == "peft_xpressor":
                out["trainable_fraction"] = res.trainable_fraction
            elif method == "full_finetune":
                out["full_finetune_trainable_fraction"] = res.trainable_fraction
        f1[method], per_seed[method], seconds[method] = float(np.mean(scores)), scores, time.time() - t
        log.info("%s: test macro-F1 %s", method, scores)
    X = log_normalized(merfish.X)
    P_train, P_test = pca(X[train], [X[~train]], n_components=30)
    out["macro_f1"] = f1
    out["macro_f1_per_seed"] = per_seed
    out["seeds"] = list(range(seed, seed + seeds))
    out["baselines"] = {"expression_pca30_probe": probe_scores(P_train, y[train], P_test, y[~train])["macro_f1"]}
    out["seconds"] = seconds
    return out


def cross_platform(model, cosmx, merfish, *, epochs: int, lr: float, seed: int, layer_mix: bool = False,
                   ema_decay: float | None = None, thinning: float | None = None) -> dict:
    from xscale.eval.metrics import log_normalized, probe_scores
    from xscale.train.finetune import encode_cells, finetune, predict_labels

    shared = sorted(set(map(str.upper, cosmx.var_names)) & set(map(str.upper, merfish.var_names)))
    c = cosmx[:, [g.upper() in shared for g in cosmx.var_names]].copy()
    m = merfish[:, [g.upper() in shared for g in merfish.var_names]].copy()
    c.obs["lineage"] = c.obs["cell_type"].astype(str).map(COSMX_TO_LINEAGE)
    yc, ym = c.obs["lineage"].astype(str).to_numpy(), m.obs["cell_type"].astype(str).to_numpy()
    res = {"n_shared_genes": len(shared), "label_map": COSMX_TO_LINEAGE, "peft_epochs": epochs, "peft_lr": lr,
           "peft_layer_mix": layer_mix, "peft_ema_decay": ema_decay, "peft_thinning": thinning}
    Zc, Zm = flat(encode_cells(model, c)), flat(encode_cells(model, m))
    f1 = {"linear_probe": probe_scores(Zc, yc, Zm, ym)["macro_f1"]}
    ft = finetune(clone(model), c, task="cell_type", label_key="lineage", trainable="xpressor", max_epochs=epochs,
                  batch_size=64, lr=lr, head_hidden=0, seed=seed, progress=False, layer_mix=layer_mix,
                  ema_decay=ema_decay, thinning=thinning)
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


# Slide-correction candidates, chosen on STARmap only: train on a random subset, score the OTHER cells.
# seqFISH is never used for the choice. Chosen = largest mixing gain among candidates that do not lower
# purity (CORRECTION_MAX_DROP). structure_weight keeps each slide's own similarities (finetune docs).
CORRECTION_GRID = ([dict(correction="adversarial", weight=3.0, epochs=e, structure_weight=s)
                    for e in (6, 12) for s in (0.0, 1.0)]
                   + [dict(correction="mmd", weight=w, epochs=e, structure_weight=s)
                      for w in (1.0, 5.0) for e in (6, 12) for s in (0.0, 1.0, 3.0)]
                   + [dict(correction="adversarial", weight=10.0, epochs=e, structure_weight=0.0) for e in (6, 12)])
# A 0.01 allowance on STARmap (the earlier rule) became a 0.0215 drop on seqFISH (tenth session), above the
# goal's 0.02: purity differences do not transfer between datasets, so the rule allows no drop at all.
CORRECTION_MAX_DROP = 0.0
# A candidate whose latents collapsed (finetune_infer.collapsed: spread < 0.1x of before, in any repeat) is not
# eligible: such latents no longer decode their cells (reconstruction_pearson), whatever the kNN scores say.
# Nor is one that shrank them below CORRECTION_MIN_SPREAD of before in any repeat (a partial collapse). Added in
# the twelfth session after the first run on the read-out-pretrained model chose MMD 5 / structure 3, which kept
# 0.38x of the spread on STARmap and dropped seqFISH's purity by 0.072 (see NOTES).
CORRECTION_MIN_SPREAD = 0.5


def reconstruction_pearson(model, adata) -> float:
    """Mean per-cell Pearson correlation between the decoded means and the observed expression, both
    log-normalised, over the genes the model knows (auto-encoding through the cell latents)."""
    from xscale.eval.metrics import log_normalized, mean_cell_pearson
    from xscale.tl.cells import reconstruct

    out = reconstruct(adata, model, copy=True)
    genes = out.var["xscale_expected_modelled"].to_numpy()
    return mean_cell_pearson(log_normalized(out.layers["xscale_expected"][:, genes]), log_normalized(adata.X[:, genes]))


def _correct(model, adata, train: np.ndarray, score: np.ndarray, *, slide_key: str, drop: tuple[str, ...], seed: int,
             correction: str, weight: float, epochs: int, structure_weight: float = 0.0) -> dict:
    from xscale.eval.metrics import knn_purity, slide_mixing
    from xscale.train.finetune import encode_cells, finetune
    from xscale.train.finetune_infer import collapsed

    keep = score & ~adata.obs["cell_type"].astype(str).isin(drop).to_numpy()
    slides, labels = adata.obs[slide_key].astype(str).to_numpy(), adata.obs["cell_type"].astype(str).to_numpy()

    def scores(m) -> dict:
        Z = flat(encode_cells(m, adata))
        return {"slide_mixing": slide_mixing(Z[score], slides[score], k=15),
                "knn_purity": knn_purity(Z[keep], labels[keep], k=15),
                "reconstruction_pearson": reconstruction_pearson(m, adata[score])}

    before = scores(model)
    t = time.time()
    res = finetune(clone(model), adata, task="batch_correction", slide_key=slide_key, trainable="xpressor",
                   train_mask=train, correction=correction, correction_weight=weight, max_epochs=epochs,
                   structure_weight=structure_weight, batch_size=64, lr=1e-3, seed=seed, progress=False)
    after = scores(res.model)
    return {"before": before, "after": after, "mixing_gain": after["slide_mixing"] - before["slide_mixing"],
            "purity_drop": before["knn_purity"] - after["knn_purity"], "correction": correction,
            "correction_weight": weight, "structure_weight": structure_weight, "epochs": epochs,
            "latent_spread": [res.metrics["latent_spread_before"], res.metrics["latent_spread_after"]],
            "collapsed": collapsed(res.metrics["latent_spread_before"], res.metrics["latent_spread_after"]),
            "neighbourhood_preservation": res.metrics["neighbourhood_preservation"],
            "trainable_fraction": res.trainable_fraction,
            "seconds": time.time() - t}


def _subset(n: int, size: int, seed: int) -> np.ndarray:
    mask = np.zeros(n, dtype=bool)
    mask[np.random.default_rng(seed).choice(n, min(size, n), replace=False)] = True
    return mask


def tune_correction(model, starmap, *, n_train: int, seed: int, grid: list[dict], repeats: int) -> dict:
    """Each candidate trains on ``n_train`` random STARmap cells and is scored on the remaining cells,
    ``repeats`` times (other subsets and seeds than the final runs'); the means decide."""
    runs = []
    for cand in grid:
        reps = []
        for rep in range(repeats):
            train = _subset(starmap.n_obs, n_train, seed + 100 + rep)
            reps.append(_correct(model, starmap, train, ~train, slide_key="slice", drop=(), seed=seed + rep, **cand))
        r = {**cand, "mixing_gain": float(np.mean([x["mixing_gain"] for x in reps])),
             "purity_drop": float(np.mean([x["purity_drop"] for x in reps])),
             "reconstruction_pearson": float(np.mean([x["after"]["reconstruction_pearson"] for x in reps])),
             "collapsed_repeats": int(sum(x["collapsed"] for x in reps)),
             "min_spread_ratio": float(min(b / a for a, b in (x["latent_spread"] for x in reps))),
             "min_preservation": float(min(x["neighbourhood_preservation"] for x in reps)), "repeats": reps}
        runs.append(r)
        log.info("tune correction %s: mixing gain %.4f, purity drop %.4f (mean of %d)", cand, r["mixing_gain"],
                 r["purity_drop"], repeats)
    ok = [r for r in runs if r["purity_drop"] <= CORRECTION_MAX_DROP and not r["collapsed_repeats"]
          and r["min_spread_ratio"] >= CORRECTION_MIN_SPREAD]
    best = max(ok, key=lambda r: r["mixing_gain"]) if ok else min(runs, key=lambda r: r["purity_drop"])
    return {"dataset": "starmap_mpfc", "n_train": n_train, "n_scored": starmap.n_obs - n_train, "repeats": repeats,
            "rule": f"largest mean mixing gain among candidates with mean purity drop <= {CORRECTION_MAX_DROP} on "
                    "the cells not trained on (mean over repeats with different training subsets and seeds) whose "
                    f"latents kept >= {CORRECTION_MIN_SPREAD} of their spread (and did not collapse) in every repeat",
            "runs": runs, "chosen": {"correction": best["correction"], "correction_weight": best["weight"],
                                     "epochs": best["epochs"], "structure_weight": best.get("structure_weight", 0.0)}}


def correction(model, adata, *, slide_key: str, drop: tuple[str, ...], seed: int, n_train: int, correction: str,
               correction_weight: float, epochs: int, repeats: int, structure_weight: float = 0.0) -> dict:
    """Train the correction on ``n_train`` random cells (CPU budget), ``repeats`` times with other subsets and
    seeds; score every cell. Gains and drops are means over the repeats."""
    reps = []
    for rep in range(repeats):
        train = _subset(adata.n_obs, n_train, seed + rep)
        reps.append(_correct(model, adata, train, np.ones(adata.n_obs, dtype=bool), slide_key=slide_key, drop=drop,
                             seed=seed + rep, correction=correction, weight=correction_weight, epochs=epochs,
                             structure_weight=structure_weight))
    mean = {k: float(np.mean([r["after"][k] for r in reps]))
            for k in ("slide_mixing", "knn_purity", "reconstruction_pearson")}
    return {"n_cells": adata.n_obs, "n_train": n_train, "slides": sorted(set(adata.obs[slide_key].astype(str))),
            "correction": correction, "correction_weight": correction_weight, "structure_weight": structure_weight,
            "epochs": epochs, "before": reps[0]["before"], "after": mean,
            "mixing_gain": float(np.mean([r["mixing_gain"] for r in reps])),
            "purity_drop": float(np.mean([r["purity_drop"] for r in reps])),
            "trainable_fraction": reps[0]["trainable_fraction"], "repeats": reps,
            "seconds": float(sum(r["seconds"] for r in reps))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a ~2-minute smoke run (numbers not meaningful)")
    p.add_argument("--pretrain-steps", type=int, default=2500)
    p.add_argument("--final-seeds", type=int, default=3, help="seeds of each chosen fine-tuning (test F1 = mean)")
    p.add_argument("--tune-seeds", type=int, default=2,
                   help="seeds of each tuning candidate; the choice uses their mean validation F1")
    p.add_argument("--correction-epochs", type=int, help="override the epochs of every correction candidate")
    p.add_argument("--correction-repeats", type=int, default=3,
                   help="training subsets / seeds per correction candidate and per final correction (means reported)")
    p.add_argument("--correction-cells", type=int, default=1200, help="cells per dataset the correction trains on")
    p.add_argument("--pretrained", help="run directory: pretrain into it, or reuse the model already there")
    p.add_argument("--sections", nargs="+", default=["transfer", "cross_platform", "correction"],
                   choices=["transfer", "cross_platform", "correction", "none"],
                   help="which parts to run (default all; 'none': only pretrain into --pretrained)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "peft.json"))
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="only merge these section outputs (same pretrained model) into --out and compute the goals")
    args = p.parse_args(argv)
    if args.merge:
        merge(args.merge, Path(args.out))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("lightning", "lightning.pytorch", "xscale.data.anndata_dataset"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    import xscale.datasets as xd

    t0 = time.time()
    rng = np.random.default_rng(args.seed)
    steps = 20 if args.quick else args.pretrain_steps
    score_epochs = {k: (1, 2) for k in SCORE_EPOCHS} if args.quick else SCORE_EPOCHS
    n_seeds = 1 if args.quick else args.final_seeds
    n_corr = 200 if args.quick else args.correction_cells
    data = {n: xd.load(n) for n in PRETRAIN + ["merfish_lung_tessera"]}
    seqfish = data["seqfish_embryo_wsir"]
    seqfish_sub = seqfish[np.sort(rng.choice(seqfish.n_obs, 800 if args.quick else 2000, replace=False))].copy()
    merfish = data["merfish_lung_tessera"]
    if args.pretrained and (Path(args.pretrained) / "model" / "config.json").exists():
        from xscale.models.io import load_model

        model, pre_s = load_model(Path(args.pretrained) / "model"), float("nan")
        meta = Path(args.pretrained) / "pretrain.json"
        if meta.exists():  # measured when this model was pretrained (an earlier invocation)
            done = json.loads(meta.read_text())
            steps, pre_s = done["steps"], done["seconds"]
        log.info("reusing the pretrained model in %s", args.pretrained)
    elif args.pretrained:
        model, pre_s = pretrain([data[n] for n in PRETRAIN], Path(args.pretrained), steps=steps, seed=args.seed)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            model, pre_s = pretrain([data[n] for n in PRETRAIN], Path(tmp), steps=steps, seed=args.seed)
    log.info("pretrained %d steps in %.0f s", steps, pre_s)
    if "none" in args.sections:
        return 0
    result: dict = {
        "pretrain": {"datasets": PRETRAIN, "steps": steps, "batch_size": 64, "seconds": pre_s,
                     "vocabulary": model.config.n_genes,
                     "config": {k: getattr(model.config, k) for k in ("dim", "depth", "n_latents", "xpressor_depth",
                                                                      "decoder_depth", "max_genes", "w_readout")}},
    }
    out = Path(args.out)

    def save() -> None:  # after every section, so a crash late in the run keeps what was measured
        result["seconds_total"] = time.time() - t0
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, json.dumps(result, indent=2, default=float))

    result["quick"] = args.quick
    result["notes"] = NOTES
    result["sections"] = args.sections
    result["torch_threads"] = args.threads
    if "transfer" in args.sections:
        tr = transfer_merfish(model, merfish, seed=args.seed, seeds=n_seeds, score_epochs=score_epochs,
                              tune_seeds=1 if args.quick else args.tune_seeds)
        log.info("MERFISH transfer: %s", tr["macro_f1"])
        result["trainable_fraction"] = tr.pop("trainable_fraction")
        result["macro_f1"] = tr.pop("macro_f1")
        result["merfish_transfer"] = tr
        save()
    if "cross_platform" in args.sections:
        # PEFT settings: those chosen on the MERFISH validation split when the transfer section ran.
        chosen = result.get("merfish_transfer", {}).get("tuning", {}).get("chosen", {}).get(
            "peft_xpressor", {"lr": 1e-2, "epochs": max(score_epochs["peft_xpressor"])})
        result["cross_platform_cosmx_to_merfish"] = cross_platform(
            model, data["cosmx_nsclc_profast"], merfish, epochs=chosen["epochs"], lr=chosen["lr"], seed=args.seed,
            layer_mix=chosen.get("layer_mix", False), ema_decay=chosen.get("ema_decay"),
            thinning=chosen.get("thinning"))
        log.info("cross-platform: %s", result["cross_platform_cosmx_to_merfish"]["macro_f1"])
        save()
    if "correction" not in args.sections:
        return 0
    t = time.time()
    grid = CORRECTION_GRID[:2] if args.quick else CORRECTION_GRID
    if args.correction_epochs is not None:
        grid = [{**g, "epochs": args.correction_epochs} for g in grid]
    reps = 1 if args.quick else args.correction_repeats
    tuning = tune_correction(model, data["starmap_mpfc"], n_train=n_corr, seed=args.seed, grid=grid, repeats=reps)
    tuning["seconds"] = time.time() - t
    chosen = tuning["chosen"]
    result["batch_correction"] = {
        "starmap_mpfc": correction(model, data["starmap_mpfc"], slide_key="slice", drop=(), seed=args.seed,
                                   n_train=n_corr, repeats=reps, **chosen),
        "seqfish_embryo_wsir": correction(model, seqfish_sub, slide_key="embryo", drop=("Low quality",),
                                          seed=args.seed, n_train=n_corr, repeats=reps, **chosen),
        "tuning": tuning,
    }
    log.info("batch correction: %s", {k: (v["mixing_gain"], v["purity_drop"])
                                      for k, v in result["batch_correction"].items() if k != "tuning"})
    save()
    if "macro_f1" not in result:
        return 0
    result["goals"] = goals(result)
    save()
    log.info("wrote %s in %.0f s; goals %s", out, result["seconds_total"], result["goals"])
    return 0


def goals(result: dict) -> dict:
    f1 = result["macro_f1"]
    bc = [v for k, v in result["batch_correction"].items() if k != "tuning"]
    return {
        "trainable_fraction<=0.10": result["trainable_fraction"] <= 0.10,
        "peft>=linear_probe": f1["peft_xpressor"] >= f1["linear_probe"],
        "peft_within_0.02_of_full": f1["peft_xpressor"] >= f1["full_finetune"] - 0.02,
        "mixing_improves": all(v["mixing_gain"] > 0 for v in bc),
        "purity_drop<0.02": all(v["purity_drop"] < 0.02 for v in bc),
    }


def merge(paths: list[str], out: Path) -> dict:
    """Merge the JSONs of runs that executed different ``--sections`` on the same pretrained model."""
    result: dict = {}
    seconds = {}
    for path in paths:
        part = json.loads(Path(path).read_text())
        seconds[" ".join(part.get("sections", [path]))] = part.pop("seconds_total", None)
        result.update(part)
    result["seconds_total"] = seconds
    result["notes"] = NOTES
    result["command"] = COMMAND
    result["sections"] = sorted({s for p in paths for s in json.loads(Path(p).read_text()).get("sections", [])})
    if "macro_f1" in result and "batch_correction" in result:
        result["goals"] = goals(result)
    atomic_write_text(out, json.dumps(result, indent=2, default=float))
    return result


if __name__ == "__main__":
    raise SystemExit(main())
