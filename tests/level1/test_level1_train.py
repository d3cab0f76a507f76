from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from xscale.data.anndata_dataset import AnnDataCellDataset, vocab_from_adatas
from xscale.data.vocab import GeneVocab
from xscale.errors import XscaleInputError
from xscale.models.gene_to_cell import GeneToCell, GeneToCellConfig
from xscale.models.io import load_model
from xscale.train.level1 import CellDataModule, GeneCellModule, fit_level1


def _human_panel(adata, n_cells: int, genes: slice):
    """A second 'dataset': other cells, a different (partly overlapping) panel, upper-case symbols."""
    other = adata[:n_cells, genes].copy()
    other.var_names = [g.upper() for g in other.var_names]
    return other


def test_level1_dataset_maps_panels_and_reports(starmap_small, caplog):
    second = _human_panel(starmap_small, 50, slice(100, 166))
    vocab = GeneVocab(list(starmap_small.var_names[:120]))
    with caplog.at_level(logging.INFO, logger="xscale.data.anndata_dataset"):
        ds = AnnDataCellDataset([starmap_small, second], vocab, slide_key=None)
    assert ds.genes_used == [120, 20]
    assert "using 20 of 66 panel genes" in caplog.text
    assert len(ds) == starmap_small.n_obs + 50
    item = ds[starmap_small.n_obs + 3]
    assert item.dataset == 1 and item.gene_ids.shape == (20,) and (item.gene_ids >= 100).all()
    expected = second.X[3].toarray().ravel()[:20]
    np.testing.assert_array_equal(item.counts, expected)
    with pytest.raises(XscaleInputError, match="shares 0 of its"):
        AnnDataCellDataset(second, GeneVocab(["NOT_A_GENE"]), min_genes=1)
    with pytest.raises(XscaleInputError, match="counts_layer"):
        AnnDataCellDataset(second, vocab, counts_layer="raw")


def test_level1_fit_two_datasets_saves_model_and_logs(starmap_small, tmp_path):
    second = _human_panel(starmap_small, 80, slice(60, 166))
    model = fit_level1(
        [starmap_small[:120].copy(), second], "tiny", out_dir=tmp_path / "run", max_steps=4, batch_size=32,
        seed=0, val_fraction=0.2, logger="csv", enable_progress_bar=False, trainer_kwargs={"log_every_n_steps": 1},
    )
    assert isinstance(model, GeneToCell) and not model.training
    assert len(model.config.genes) == 166  # union of both panels
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()
    assert list((tmp_path / "run" / "logs").rglob("metrics.csv"))
    loaded = load_model(tmp_path / "run" / "model")
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)


def test_level1_module_step_updates_weights(starmap_small):
    vocab = vocab_from_adatas([starmap_small])
    dm = CellDataModule.from_adatas(starmap_small, vocab, val_fraction=0.1, batch_size=16, max_genes=64)
    batch = next(iter(dm.train_dataloader()))
    assert batch.gene_ids.shape[0] == 16 and batch.gene_ids.shape[1] <= 64
    torch.manual_seed(0)
    module = GeneCellModule(GeneToCell(GeneToCellConfig.preset("tiny", genes=vocab.genes)), lr=1e-2)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-2)
    before = module.model.value_encoder.gene_direction.weight.detach().clone()
    module.log = lambda *a, **k: None  # no trainer attached
    loss = module.training_step(batch, 0)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert not torch.equal(before, module.model.value_encoder.gene_direction.weight)


def test_level1_fit_sets_gene_statistics_from_training_cells(starmap_small, tmp_path):
    from xscale.models.gene_to_cell import GeneToCellConfig

    genes = vocab_from_adatas([starmap_small]).genes
    config = GeneToCellConfig.preset("tiny", genes=genes, standardize_values=True, decoder_gene_bias=True)
    model = fit_level1(starmap_small, config, out_dir=tmp_path / "run", max_steps=1, batch_size=32, seed=0,
                       val_fraction=0.0, logger="none", enable_progress_bar=False)
    ids, share, v_mean, v_std = AnnDataCellDataset(starmap_small, model.vocab).gene_stats()
    np.testing.assert_allclose(model.value_mean[ids].numpy(), v_mean, rtol=1e-5)
    np.testing.assert_allclose(model.value_std[ids].numpy(), np.maximum(v_std, 0.1), rtol=1e-5)
    # the offset started at the centred log share and moved by at most one Adam step (lr 2e-3)
    start = np.log(np.maximum(share, 1e-8)) - np.log(np.maximum(share, 1e-8)).mean()
    np.testing.assert_allclose(model.gene_bias[ids].detach().numpy(), start, atol=5e-3)


def test_level1_fit_passes_weight_decay_to_the_optimiser(starmap_small, tmp_path):
    import lightning

    seen = []

    class Groups(lightning.Callback):
        def on_train_start(self, trainer, pl_module):
            seen.extend(g["weight_decay"] for g in trainer.optimizers[0].param_groups)

    fit_level1(starmap_small[:64].copy(), "tiny", out_dir=tmp_path / "run", max_steps=1, batch_size=32, seed=0,
               weight_decay=0.3, val_fraction=0.0, logger="none", enable_progress_bar=False,
               trainer_kwargs={"callbacks": [Groups()]})
    assert seen == [0.3, 0.0]  # weight matrices and embedding tables; biases and norms are not decayed
    with pytest.raises(ValueError, match="weight_decay=-1"):
        fit_level1(starmap_small[:64].copy(), "tiny", out_dir=tmp_path / "bad", max_steps=1, weight_decay=-1.0,
                   val_fraction=0.0, logger="none", enable_progress_bar=False)


def test_collate_workers_draw_their_own_gene_contexts():
    """Each DataLoader worker holds a copy of CollateCells: without re-seeding per worker they drew the
    same sampled zeros for their batches; in the main process the generator is the seeded one."""
    import numpy as np
    from torch.utils.data import DataLoader

    from xscale.data.batch import CellItem, collate_cells
    from xscale.train.level1 import CollateCells

    counts = np.r_[np.ones(2, np.float32), np.zeros(48, np.float32)]  # 2 expressed, 8 of 48 zeros sampled
    items = [CellItem(gene_ids=np.arange(50), counts=counts, index=i, dataset=0, slide=0) for i in range(8)]
    two = list(DataLoader(items, batch_size=4, collate_fn=CollateCells(10, seed=0), num_workers=2))
    assert not np.array_equal(two[0].gene_ids.numpy(), two[1].gene_ids.numpy())
    again = list(DataLoader(items, batch_size=4, collate_fn=CollateCells(10, seed=0), num_workers=2))
    assert all(np.array_equal(a.gene_ids.numpy(), b.gene_ids.numpy()) for a, b in zip(two, again, strict=True))
    main = list(DataLoader(items, batch_size=4, collate_fn=CollateCells(10, seed=0), num_workers=0))
    ref = collate_cells(items[:4], max_genes=10, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(main[0].gene_ids.numpy(), ref.gene_ids.numpy())


def test_validation_contexts_are_the_same_every_epoch():
    """For a panel longer than max_genes the validation batches sampled new zeros every epoch, so the
    validation loss moved with the sampling; the validation collate now draws them from the cells."""
    import numpy as np
    from torch.utils.data import DataLoader

    from xscale.data.batch import CellItem
    from xscale.train.level1 import CollateCells

    counts = np.r_[np.ones(2, np.float32), np.zeros(48, np.float32)]
    items = [CellItem(gene_ids=np.arange(50), counts=counts, index=i, dataset=0, slide=0) for i in range(8)]
    val = DataLoader(items, batch_size=4, collate_fn=CollateCells(10, seed=1, fixed=True))
    first, second = list(val), list(val)  # two epochs over the same loader
    assert all(np.array_equal(a.gene_ids.numpy(), b.gene_ids.numpy()) for a, b in zip(first, second, strict=True))
    assert not np.array_equal(first[0].gene_ids.numpy(), first[1].gene_ids.numpy())  # batches still differ
    train = DataLoader(items, batch_size=4, collate_fn=CollateCells(10, seed=1))
    t1, t2 = list(train), list(train)
    assert not np.array_equal(t1[0].gene_ids.numpy(), t2[0].gene_ids.numpy())  # training keeps resampling
