"""A fit interrupted after a checkpoint and resumed ends bit-identical to an uninterrupted fit.

The interruption is an exception raised at the start of the batch after the checkpoint (what a
SIGKILL leaves behind: ``last.ckpt`` at step k, nothing after it). The resumed run must restore
the masking/thinning generator, the global generators, the shuffle order of the epoch, its
position in the epoch and the collate function's gene-context generator; mid-epoch and at an
epoch's end.
"""
from __future__ import annotations

import logging

import lightning
import numpy as np
import pytest
import torch

import xscale.datasets as datasets
from xscale.train.checkpointing import fit_resumable, load_lightning_checkpoint

RNG_KEY = "xscale_rng"  # where the modules keep their generator states in a checkpoint

KW = dict(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", limit_val_batches=0,
          num_sanity_val_steps=0, gradient_clip_val=1.0)


class Crash(Exception):
    pass


class CrashAt(lightning.pytorch.callbacks.Callback):
    """Raise before the batch after global step ``step`` (its checkpoint is written by then)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise Crash


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    diff = {k: (a[k].float() - b[k].float()).abs().max().item() for k in a if not torch.equal(a[k], b[k])}
    assert not diff, f"resumed run differs from the uninterrupted one: {dict(list(diff.items())[:5])}"


@pytest.fixture(scope="module")
def cells():
    torch.set_num_threads(1)
    a = datasets.load("starmap_mpfc")
    return a[np.sort(np.random.default_rng(0).choice(a.n_obs, 300, replace=False))].copy()


def _level1_batches(adata, batch_size: int) -> int:
    from xscale.data.anndata_dataset import vocab_from_adatas
    from xscale.train.level1 import CellDataModule

    dm = CellDataModule.from_adatas([adata], vocab_from_adatas([adata]), batch_size=batch_size, seed=0)
    return len(dm.train_dataloader())


@pytest.mark.parametrize("max_epochs", [None, 50])  # an epoch budget too, as xscale run gives (the warm-up then
# asks for the stepping batches, which sets the data up before Lightning restores the checkpoint)
@pytest.mark.parametrize("where", ["mid_epoch", "epoch_end"])
def test_level1_resume_is_bit_identical(cells, tmp_path, where, max_epochs):
    from xscale.models.gene_to_cell import GeneToCellConfig
    from xscale.train.level1 import fit_level1

    per_epoch = _level1_batches(cells, 32)
    assert per_epoch >= 6
    k = per_epoch // 2 + 1 if where == "mid_epoch" else per_epoch
    n = per_epoch + k + 3  # the resumed run finishes this epoch (or the next) and starts another
    # max_genes below the panel: the gene contexts are drawn by the collate generator too
    config = GeneToCellConfig.preset("tiny", genes=list(cells.var_names), max_genes=64)
    kw = dict(max_steps=n, batch_size=32, seed=0, logger="none", accelerator="cpu", enable_progress_bar=False,
              checkpoint_every_n_steps=k, **({} if max_epochs is None else {"max_epochs": max_epochs}))
    straight = fit_level1(cells, config, out_dir=tmp_path / "a", **kw).state_dict()
    with pytest.raises(Crash):
        fit_level1(cells, config, out_dir=tmp_path / "b", trainer_kwargs={"callbacks": [CrashAt(k)]}, **kw)
    ckpt = load_lightning_checkpoint(tmp_path / "b" / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == k
    assert ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]["is_last_batch"] is (where == "epoch_end")
    resumed = fit_level1(cells, config, out_dir=tmp_path / "b", **kw).state_dict()
    _assert_same(straight, resumed)


def _level2(seed: int = 0):
    from xscale.models.cell_to_tissue import CellToTissue, CellToTissueConfig
    from xscale.train.level2 import NicheDataModule, NicheDataset, TissueModule, make_niches

    rng = np.random.default_rng(0)
    latents = rng.normal(size=(300, 16)).astype(np.float32)
    coords = rng.uniform(0, 100, size=(300, 2))
    lightning.seed_everything(seed, workers=True, verbose=False)
    config = CellToTissueConfig.preset("tiny", in_dim=16, max_cells=8)
    niches = make_niches(coords, np.arange(300), max_cells=config.max_cells)
    data = NicheDataModule(NicheDataset(latents, niches), batch_size=32, seed=seed)
    model = CellToTissue(config)
    model.set_latent_scaling(torch.from_numpy(latents))
    return TissueModule(model), data


@pytest.mark.parametrize("k", [4, 10])  # 10 batches per epoch: mid-epoch and the epoch's last batch
def test_level2_resume_is_bit_identical(tmp_path, k):
    n = 16
    module, data = _level2()
    fit_resumable(module, datamodule=data, ckpt_dir=tmp_path / "a", trainer_kwargs=dict(max_steps=n, **KW),
                  every_n_train_steps=k)
    straight = module.state_dict()
    module, data = _level2()
    with pytest.raises(Crash):
        fit_resumable(module, datamodule=data, ckpt_dir=tmp_path / "b",
                      trainer_kwargs=dict(max_steps=n, callbacks=[CrashAt(k)], **KW), every_n_train_steps=k)
    module, data = _level2()
    fit_resumable(module, datamodule=data, ckpt_dir=tmp_path / "b", trainer_kwargs=dict(max_steps=n, **KW),
                  every_n_train_steps=k)
    _assert_same(straight, module.state_dict())


def _joint(cells):
    from xscale.data.anndata_dataset import AnnDataCellDataset
    from xscale.models.cell_to_tissue import CellToTissue, CellToTissueConfig
    from xscale.models.gene_to_cell import GeneToCell, GeneToCellConfig
    from xscale.train.joint import HierarchyModule, JointNicheDataset
    from xscale.train.level2 import make_niches

    lightning.seed_everything(0, workers=True, verbose=False)
    l1 = GeneToCell(GeneToCellConfig.preset("tiny", genes=list(cells.var_names), max_genes=48))
    l2 = CellToTissue(CellToTissueConfig.preset("tiny", in_dim=l1.config.latents_per_cell * l1.config.dim,
                                                max_cells=4))
    niches = make_niches(cells.obsm["spatial"], np.arange(48), max_cells=4,
                         slides=cells.obs["slice"].astype(str).to_numpy())
    data = JointNicheDataset(AnnDataCellDataset(cells, l1.vocab, slide_key="slice"), niches, max_genes=48, seed=0)
    return HierarchyModule(l1, l2), data.loader(8, shuffle=True, seed=0)  # 6 batches per epoch


def test_joint_resume_mid_epoch_is_bit_identical(cells, tmp_path):
    n, k = 9, 3
    module, loader = _joint(cells)
    fit_resumable(module, train_dataloaders=loader, ckpt_dir=tmp_path / "a",
                  trainer_kwargs=dict(max_steps=n, **KW), every_n_train_steps=k)
    straight = module.state_dict()
    module, loader = _joint(cells)
    with pytest.raises(Crash):
        fit_resumable(module, train_dataloaders=loader, ckpt_dir=tmp_path / "b",
                      trainer_kwargs=dict(max_steps=n, callbacks=[CrashAt(k)], **KW), every_n_train_steps=k)
    module, loader = _joint(cells)
    fit_resumable(module, train_dataloaders=loader, ckpt_dir=tmp_path / "b",
                  trainer_kwargs=dict(max_steps=n, **KW), every_n_train_steps=k)
    _assert_same(straight, module.state_dict())


def test_checkpoint_without_rng_state_still_resumes_with_a_warning(tmp_path, caplog):
    """A checkpoint written before the generator states were saved: today's behaviour, and a warning."""
    module, data = _level2()
    with pytest.raises(Crash):
        fit_resumable(module, datamodule=data, ckpt_dir=tmp_path, every_n_train_steps=4,
                      trainer_kwargs=dict(max_steps=8, callbacks=[CrashAt(4)], **KW))
    last = tmp_path / "last.ckpt"
    ckpt = load_lightning_checkpoint(last)
    ckpt.pop(RNG_KEY, None)
    ckpt["loops"]["fit_loop"]["state_dict"].pop("combined_loader", None)
    torch.save(ckpt, last)
    module, data = _level2()
    with caplog.at_level(logging.WARNING, logger="xscale.train.checkpointing"):
        trainer = fit_resumable(module, datamodule=data, ckpt_dir=tmp_path, every_n_train_steps=4,
                                trainer_kwargs=dict(max_steps=8, **KW))
    assert trainer.global_step == 8
    assert "will not be bit-identical" in caplog.text


@pytest.fixture(scope="module")
def cell_store(cells, tmp_path_factory):
    """The 300 cells prepared into 64-cell blocks (5 blocks; with 2 workers, 2 shards)."""
    from xscale.data.prepare import prepare

    return prepare(cells, tmp_path_factory.mktemp("resume_store") / "cells.zarr", slide_key="slice",
                   chunk_cells=64, progress=False)


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("where", ["mid_epoch", "epoch_end"])
def test_level1_store_resume_is_bit_identical(cells, cell_store, tmp_path, where, num_workers):
    """Training streamed from a store (a batched CellStream, no map-style sampler to rewind): the resumed epoch
    reads the same stream again and skips the batches already trained on."""
    from xscale.data.anndata_dataset import vocab_from_adatas
    from xscale.models.gene_to_cell import GeneToCellConfig
    from xscale.train.level1 import fit_level1
    from xscale.train.level1_store import store_data

    dm = store_data(cell_store, vocab_from_adatas([cells]), val_fraction=0.0, max_genes=64, batch_size=32,
                    num_workers=num_workers)
    per_epoch = sum(1 for _ in dm.train_dataloader())
    assert per_epoch >= 6
    k = per_epoch // 2 + 1 if where == "mid_epoch" else per_epoch
    n = per_epoch + k + 3
    config = GeneToCellConfig.preset("tiny", genes=list(cells.var_names), max_genes=64)
    kw = dict(max_steps=n, max_epochs=50, batch_size=32, seed=0, logger="none", accelerator="cpu",
              enable_progress_bar=False, checkpoint_every_n_steps=k, val_fraction=0.0, num_workers=num_workers)
    straight = fit_level1(cell_store, config, out_dir=tmp_path / "a", **kw).state_dict()
    with pytest.raises(Crash):
        fit_level1(cell_store, config, out_dir=tmp_path / "b", trainer_kwargs={"callbacks": [CrashAt(k)]}, **kw)
    assert load_lightning_checkpoint(tmp_path / "b" / "checkpoints" / "last.ckpt")["global_step"] == k
    resumed = fit_level1(cell_store, config, out_dir=tmp_path / "b", **kw).state_dict()
    _assert_same(straight, resumed)


def _level2_stream(store, num_workers: int):
    from xscale.models.cell_to_tissue import CellToTissue, CellToTissueConfig
    from xscale.train.level2 import TissueModule
    from xscale.train.niche_stream_data import NicheStreamDataModule

    latents = np.random.default_rng(1).normal(size=(300, 16)).astype(np.float32)
    lightning.seed_everything(0, workers=True, verbose=False)
    model = CellToTissue(CellToTissueConfig.preset("tiny", in_dim=16, max_cells=6))
    model.set_latent_scaling(torch.from_numpy(latents))
    data = NicheStreamDataModule(store, latents, max_cells=6, batch_size=16, num_workers=num_workers, seed=0)
    return TissueModule(model), data


@pytest.mark.parametrize("num_workers", [0, 2])
def test_level2_store_resume_mid_epoch_is_bit_identical(cell_store, tmp_path, num_workers):
    n, k = 16, 5  # 300 niche centres, batches of 16: ~18 per epoch (9 per worker with 2)
    module, data = _level2_stream(cell_store, num_workers)
    fit_resumable(module, datamodule=data, ckpt_dir=tmp_path / "a", trainer_kwargs=dict(max_steps=n, **KW),
                  every_n_train_steps=k)
    straight = module.state_dict()
    module, data = _level2_stream(cell_store, num_workers)
    with pytest.raises(Crash):
        fit_resumable(module, datamodule=data, ckpt_dir=tmp_path / "b",
                      trainer_kwargs=dict(max_steps=n, callbacks=[CrashAt(k)], **KW), every_n_train_steps=k)
    module, data = _level2_stream(cell_store, num_workers)
    fit_resumable(module, datamodule=data, ckpt_dir=tmp_path / "b", trainer_kwargs=dict(max_steps=n, **KW),
                  every_n_train_steps=k)
    _assert_same(straight, module.state_dict())
