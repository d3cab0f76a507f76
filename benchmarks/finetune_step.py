"""Slide-correction training step: encoder states shared with the frozen reference vs its own pass.

``xscale finetune --task batch_correction`` with the structure term (the default) compares
the model's cell latents with those of a frozen copy of the pretrained model every step.
When only the Xpressor trains, both models' embedders and encoder are the same frozen
weights, so ``FinetuneModule(share_encoder=True)`` (what ``finetune`` uses then) computes
their encoder states once and runs only the copy's Xpressor; ``share_encoder=False`` (the
naive reference) runs the copy's whole encoder again. Both give the same loss and gradients
(``tests/finetune/test_finetune_peft.py::test_shared_encoder_states_equal_the_reference_pass``).

Measured here, for two model shapes with random weights (speed does not depend on what the
weights learned): the peft benchmark's pretraining shape (``PRETRAIN_CONFIG``: 8 encoder
layers, 64-gene context) and the demo's ``small`` preset (1 layer, 192-gene context). For each,
full training steps (forward, MMD + structure + NB reconstruction as ``finetune`` sets them,
backward, AdamW) on real STARmap batches of 64 cells, shared and naive alternating in one
process; CPU seconds with torch on 1 thread, the median over ``--repeats`` rounds of ``--steps`` steps.

Run: ``.venv/bin/python benchmarks/finetune_step.py`` (~1-2 minutes). Writes
``benchmarks/results/finetune_step.json``.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
OUT = Path(__file__).parent / "results" / "finetune_step.json"


def _batches(adata, vocab, n: int, batch_size: int, max_genes: int, seed: int):
    from xscale.data.anndata_dataset import AnnDataCellDataset
    from xscale.data.batch import collate_cells

    ds = AnnDataCellDataset(adata, vocab, slide_key="slice")
    rng = np.random.default_rng(seed)
    return [collate_cells([ds[int(i)] for i in rng.choice(len(ds), batch_size, replace=False)],
                          max_genes=max_genes, rng=rng) for _ in range(n)]


def _module(model, share: bool):
    from xscale.train.finetune import DEFAULT_STRUCTURE_WEIGHT, set_trainable
    from xscale.train.finetune_module import FinetuneModule

    model = copy.deepcopy(model)
    model.add_layer_mix()  # as the peft benchmark's PEFT runs; harmless for the correction
    set_trainable(model, None, "xpressor")
    reference = copy.deepcopy(model)
    module = FinetuneModule(model, task="batch_correction", correction="mmd", correction_weight=1.0,
                            reconstruction_weight=1.0, structure_weight=DEFAULT_STRUCTURE_WEIGHT,
                            reference=reference, share_encoder=share, lr=1e-3)
    module.reference.eval()
    return module, module.configure_optimizers()


def _round(module, opt, batches) -> tuple[float, float]:
    """CPU and wall seconds of one training step per batch."""
    c0, w0 = time.process_time(), time.perf_counter()
    for i, b in enumerate(batches):
        opt.zero_grad(set_to_none=True)
        loss = module.training_step(b, i)
        loss.backward()
        opt.step()
    return time.process_time() - c0, time.perf_counter() - w0


def measure(preset: str, overrides: dict, adata, *, steps: int, repeats: int, batch_size: int) -> dict:
    from xscale.data.anndata_dataset import vocab_from_adatas
    from xscale.models.gene_to_cell import GeneToCell, GeneToCellConfig

    vocab = vocab_from_adatas([adata])
    torch.manual_seed(0)
    base = GeneToCell(GeneToCellConfig.preset(preset, genes=list(vocab.genes), **overrides))
    batches = _batches(adata, vocab, steps, batch_size, base.config.max_genes, seed=0)
    runs = {True: _module(base, True), False: _module(base, False)}
    for module, opt in runs.values():  # warm-up: allocator, first-call costs
        _round(module, opt, batches[:2])
    cpu = {True: [], False: []}
    wall = {True: [], False: []}
    for _ in range(repeats):  # alternate, so load changes hit both alike
        for share, (module, opt) in runs.items():
            c, w = _round(module, opt, batches)
            cpu[share].append(c)
            wall[share].append(w)
    med = {s: float(np.median(cpu[s])) / steps for s in cpu}
    return {
        "preset": preset, "overrides": overrides,
        "config": {k: getattr(base.config, k) for k in ("dim", "depth", "n_latents", "max_genes", "encoder")},
        "batch_size": batch_size, "steps_per_round": steps, "repeats": repeats,
        "genes_per_cell": int(batches[0].gene_ids.shape[1]),
        "shared_ms_per_step": round(1e3 * med[True], 2),
        "naive_ms_per_step": round(1e3 * med[False], 2),
        "speedup": round(med[False] / med[True], 3),
        "cpu_s_each": {"shared": [round(c, 3) for c in cpu[True]], "naive": [round(c, 3) for c in cpu[False]]},
        "wall_s_each": {"shared": [round(c, 3) for c in wall[True]], "naive": [round(c, 3) for c in wall[False]]},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")  # FinetuneModule.log outside a Trainer
    torch.set_num_threads(1)
    import xscale.datasets

    from peft import PRETRAIN_CONFIG

    adata = xscale.datasets.load("starmap_mpfc")
    shapes = {"peft_pretrain_shape": ("tiny", PRETRAIN_CONFIG), "small_preset": ("small", {})}
    results = {"method": "CPU seconds per training step (torch on 1 thread), median over rounds; shared and naive "
                         "alternate in one process on the same batches; the ratio is the result (absolute times "
                         "vary with the machine's load).",
               "task": "batch_correction: MMD weight 1, structure weight as finetune's default, NB reconstruction "
                       "weight 1, trainable='xpressor' with the layer mix"}
    for name, (preset, overrides) in shapes.items():
        results[name] = measure(preset, overrides, adata, steps=args.steps, repeats=args.repeats,
                                batch_size=args.batch_size)
        r = results[name]
        print(f"{name}: shared {r['shared_ms_per_step']} ms/step, naive {r['naive_ms_per_step']} ms/step, "
              f"speedup {r['speedup']}x", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(args.out)


if __name__ == "__main__":
    main()
