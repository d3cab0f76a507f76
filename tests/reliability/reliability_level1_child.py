"""Child process for the level-1 kill/resume test.

``python reliability_level1_child.py OUT_DIR MAX_STEPS EVERY SLEEP`` trains a tiny
``GeneToCell`` on 600 real STARmap cells with :func:`xscale.train.level1.fit_level1`
(which checkpoints through ``fit_resumable``). Prints ``START <global_step>`` when the
training loop starts and ``END <global_step>`` when the fit returns.
"""
from __future__ import annotations

import sys
import time

import lightning
import numpy as np
import torch


class Report(lightning.pytorch.callbacks.Callback):
    def __init__(self, sleep: float) -> None:
        self.sleep = sleep

    def on_train_start(self, trainer, pl_module):
        print(f"START {trainer.global_step}", flush=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        time.sleep(self.sleep)  # slow enough that the parent can kill mid-training

    def on_train_end(self, trainer, pl_module):
        print(f"END {trainer.global_step}", flush=True)


if __name__ == "__main__":
    out_dir, max_steps, every, sleep = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    torch.set_num_threads(1)
    import xscale
    from xscale.train.level1 import fit_level1

    adata = xscale.datasets.load("starmap_mpfc")
    adata = adata[np.sort(np.random.default_rng(0).choice(adata.n_obs, 600, replace=False))].copy()
    fit_level1(adata, "tiny", out_dir=out_dir, max_steps=max_steps, batch_size=32, seed=0, logger="none",
               accelerator="cpu", enable_progress_bar=False, checkpoint_every_n_steps=every,
               trainer_kwargs={"callbacks": [Report(sleep)]})
