"""A real 2-process DDP fit on CPU (gloo), run by tests/perf/test_perf_ddp.py in a child process.

Lightning re-runs this file for rank 1, hence the ``__main__`` guard. Each rank writes
the cell indices it trained on and its final weights to ``OUT/rank{r}.npz``.

Usage: python tests/perf/ddp_fit_script.py OUT [STRATEGY]
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np


def main(out: Path, strategy: str) -> None:
    import lightning
    import torch

    import xscale
    from xscale.data.anndata_dataset import AnnDataCellDataset
    from xscale.models.gene_to_cell import GeneToCell, GeneToCellConfig
    from xscale.train.level1 import CellDataModule, GeneCellModule

    torch.set_num_threads(1)
    lightning.seed_everything(0, verbose=False)
    adata = xscale.datasets.load("starmap_mpfc")[:256].copy()
    model = GeneToCell(GeneToCellConfig.preset("tiny", genes=[str(g) for g in adata.var_names]))
    dataset = AnnDataCellDataset(adata, model.vocab)
    dm = CellDataModule(dataset, None, max_genes=256, batch_size=16, seed=0)
    seen: list[int] = []

    class Record(lightning.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.extend(int(i) for i in batch.index)

    trainer = lightning.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=[Record()],
        default_root_dir=str(out),
    )
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainer.fit(GeneCellModule(model, lr=3e-3), datamodule=dm)
    state = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    moved = sum(float((model.state_dict()[k] - v).abs().sum()) for k, v in init.items())
    np.savez(out / f"rank{trainer.global_rank}.npz", __seen__=np.asarray(seen, dtype=np.int64),
             __world__=np.int64(trainer.world_size), __steps__=np.int64(trainer.global_step),
             __moved__=np.float64(moved), **state)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "ddp")
