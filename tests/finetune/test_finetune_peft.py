"""Fine-tuning only the Xpressor: heads, freezing, both tasks, saved outputs and the CLI."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from xscale.errors import XscaleInputError
from xscale.models.gene_to_cell import GeneToCell, GeneToCellConfig
from xscale.models.heads import ClassificationHead, HeadConfig, SlideDiscriminator, grad_reverse, mmd_loss
from xscale.models.io import load_model, save_model
from xscale.train.finetune import encode_cells, finetune, set_trainable


@pytest.fixture(scope="module")
def starmap_small():
    import xscale.datasets

    adata = xscale.datasets.load("starmap_mpfc")
    rng = np.random.default_rng(0)
    return adata[np.sort(rng.choice(adata.n_obs, 360, replace=False))].copy()


def _model(genes, pooling="xpressor") -> GeneToCell:
    torch.manual_seed(0)
    model = GeneToCell(GeneToCellConfig.preset("tiny", genes=list(genes), pooling=pooling))
    with torch.no_grad():  # stands in for pretraining: distinct gene tokens, so the frozen encoder keeps identity
        model.gene_embedder.table.weight.normal_(std=1.0)
    return model


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _left_half(adata) -> np.ndarray:
    """(n_obs,) bool: cells left of the median x (a spatial training half)."""
    return adata.obsm["spatial"][:, 0] < np.median(adata.obsm["spatial"][:, 0])


def _finetune_left_half(adata, **kwargs):
    """Cell-type fine-tuning of a fresh model on the left half, 2 epochs; returns (result,
    names of the weights that changed or were added)."""
    model = _model(adata.var_names)
    before = _state(model)
    res = finetune(model, adata, task="cell_type", label_key="cell_type", train_mask=_left_half(adata),
                   max_epochs=2, batch_size=32, progress=False, **kwargs)
    changed = {k for k, v in res.model.state_dict().items() if k not in before or not torch.equal(v, before[k])}
    return res, changed


def test_gradient_reversal_and_heads(tmp_path):
    x = torch.randn(3, 4, requires_grad=True)
    (grad_reverse(x, 0.5) * 2).sum().backward()
    torch.testing.assert_close(x.grad, torch.full((3, 4), -1.0))
    disc = SlideDiscriminator(8, 2, 3)
    z = torch.randn(5, 2, 8, requires_grad=True)
    torch.nn.functional.cross_entropy(disc(z), torch.tensor([0, 1, 2, 0, 1])).backward()
    assert disc.net[1].weight.grad is not None and z.grad is not None
    head = ClassificationHead(HeadConfig(dim=8, n_latents=2, classes=("a", "b", "c")))
    assert head(z).shape == (5, 3)
    head.eval()
    save_model(head, tmp_path / "head")
    again = load_model(tmp_path / "head")
    assert again.config.classes == ("a", "b", "c")
    torch.testing.assert_close(head(z), again(z))
    assert set(head.predict(z)) <= {"a", "b", "c"}
    with pytest.raises(ValueError, match="at least 2 classes"):
        HeadConfig(dim=8, n_latents=2, classes=("a",))


def test_mmd_separates_shifted_groups():
    g = torch.Generator().manual_seed(0)
    same = torch.randn(64, 5, generator=g)
    groups = torch.arange(64) % 2
    shifted = same + groups[:, None] * 3.0
    assert mmd_loss(shifted, groups) > 5 * mmd_loss(same, groups)
    assert mmd_loss(same, torch.zeros(64, dtype=torch.long)) == 0


def test_set_trainable_freezes_all_but_the_xpressor(starmap_small):
    model = _model(starmap_small.var_names)
    head = ClassificationHead(HeadConfig(dim=32, n_latents=4, classes=("a", "b")))
    n_train, n_total = set_trainable(model, head, "xpressor")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("xpressor.") for n in trainable)
    assert trainable == {n for n, _ in model.named_parameters() if n.startswith("xpressor.")}
    n_x = sum(p.numel() for p in model.xpressor.parameters()) + sum(p.numel() for p in head.parameters())
    assert n_train == n_x
    assert n_total == sum(p.numel() for p in model.parameters()) + sum(p.numel() for p in head.parameters())
    assert set_trainable(model, head, "head")[0] == sum(p.numel() for p in head.parameters())
    with pytest.raises(XscaleInputError, match="needs a model with an Xpressor"):
        set_trainable(_model(starmap_small.var_names, pooling="mean"), None, "xpressor")


def test_finetune_cell_type_changes_only_xpressor_and_head(starmap_small, tmp_path):
    adata = starmap_small
    train = _left_half(adata)
    res, changed = _finetune_left_half(adata, output_dir=tmp_path / "ft", log_dir=tmp_path / "logs")
    assert changed and all(k.startswith("xpressor.") for k in changed)
    assert 0 < res.trainable_fraction < 1 and res.head is not None
    assert 0.0 <= res.metrics["macro_f1"] <= 1.0 and "accuracy" in res.metrics
    doc = json.loads((tmp_path / "ft" / "finetune.json").read_text())
    assert doc["trainable_fraction"] == pytest.approx(res.trainable_fraction)
    assert doc["classes"] == sorted(set(adata.obs["cell_type"].astype(str)[train]))
    reloaded = load_model(tmp_path / "ft" / "model")
    np.testing.assert_allclose(encode_cells(reloaded, adata[:20]), encode_cells(res.model, adata[:20]), atol=1e-5)
    assert isinstance(load_model(tmp_path / "ft" / "head"), ClassificationHead)
    assert any((tmp_path / "logs").rglob("metrics.csv"))
    assert all(p.requires_grad for p in res.model.parameters())  # caller's flags restored


def test_finetune_learns_labels_from_the_xpressor(starmap_small):
    from sklearn.metrics import f1_score

    from xscale.train.finetune import predict_labels

    adata = starmap_small[starmap_small.obs["cell_type"].isin(["Astro", "Endo", "eL6-1", "Oligo"])].copy()
    res = finetune(_model(adata.var_names), adata, task="cell_type", label_key="cell_type", max_epochs=20,
                   batch_size=32, lr=3e-3, progress=False)
    pred = predict_labels(res.model, res.head, adata, key_added="pred")
    truth = adata.obs["cell_type"].astype(str).to_numpy()
    # Encoder and gene tokens are random and frozen: the Xpressor + head alone must fit the labels.
    assert f1_score(truth, pred, average="macro") > 0.6
    assert list(adata.obs["pred"]) == list(pred)
    assert list(adata.obs["pred"].cat.categories) == list(res.head.config.classes)  # categorical, head's order


@pytest.mark.parametrize("correction", ["adversarial", "mmd"])
def test_finetune_batch_correction_keeps_decoder_frozen(starmap_small, correction):
    model = _model(starmap_small.var_names)
    before = _state(model)
    res = finetune(model, starmap_small, task="batch_correction", slide_key="slice", correction=correction,
                   max_steps=4, batch_size=48, progress=False)
    changed = {k for k, v in res.model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("xpressor.") for k in changed)
    assert res.head is None and np.isfinite(res.metrics["final_loss"])


def test_finetune_input_errors(starmap_small):
    model = _model(starmap_small.var_names)
    with pytest.raises(XscaleInputError, match="Available"):
        finetune(model, starmap_small, task="cell_type", label_key="nope", progress=False)
    with pytest.raises(XscaleInputError, match="trainable='xpressor' or 'all'"):
        finetune(model, starmap_small, task="batch_correction", slide_key="slice", trainable="head", progress=False)
    with pytest.raises(XscaleInputError, match="boolean of shape"):
        finetune(model, starmap_small, label_key="cell_type", train_mask=np.ones(3, bool), progress=False)


def test_cli_finetune(starmap_small, tmp_path, capsys):
    from xscale.cli.main import main

    save_model(_model(starmap_small.var_names), tmp_path / "pre")
    adata = starmap_small.copy()
    adata.obs["split"] = np.where(np.arange(adata.n_obs) % 2 == 0, "train", "test")
    adata.write_h5ad(tmp_path / "d.h5ad")
    rc = main(["finetune", str(tmp_path / "pre"), str(tmp_path / "d.h5ad"), "--out", str(tmp_path / "ft"),
               "--label-key", "cell_type", "--train-key", "split", "--train-values", "train", "--epochs", "1",
               "--no-progress", "--write-h5ad", str(tmp_path / "out.h5ad")])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[0])
    assert 0 < summary["trainable_fraction"] < 1 and "macro_f1" in summary
    import anndata as ad

    out = ad.read_h5ad(tmp_path / "out.h5ad")
    assert "xscale_pred_cell_type" in out.obs and out.obsm["X_xscale_cell"].shape == (adata.n_obs, 4 * 32)
    rc = main(["finetune", str(tmp_path / "pre"), str(tmp_path / "d.h5ad"), "--out", str(tmp_path / "x"),
               "--label-key", "cell_type", "--train-key", "split", "--train-values", "nope"])
    assert rc == 2 and "No cell has obs['split']" in capsys.readouterr().err
    # --write-h5ad that cannot take the file: refused before training, nothing left behind
    (tmp_path / "preds").mkdir()
    for target, says in ((tmp_path / "preds", "expected a file path"), (tmp_path / "p.csv", "ending in .h5ad")):
        rc = main(["finetune", str(tmp_path / "pre"), str(tmp_path / "d.h5ad"), "--out", str(tmp_path / "y"),
                   "--label-key", "cell_type", "--epochs", "1", "--write-h5ad", str(target)])
        assert rc == 2 and says in capsys.readouterr().err
    assert not (tmp_path / "y").exists() and list((tmp_path / "preds").iterdir()) == []


def test_cli_finetune_reads_anndata_and_spatialdata_zarr(starmap_small, tmp_path, capsys):
    """The data argument takes an AnnData zarr and a SpatialData zarr (its table), as embed and run do."""
    import spatialdata as sd
    from spatialdata.models import ShapesModel, TableModel

    from xscale.cli.main import main
    from xscale.data.zarr_settings import unsharded, zarr_format_2

    save_model(_model(starmap_small.var_names), tmp_path / "pre")
    adata = starmap_small[:120].copy()
    with zarr_format_2():
        adata.write_zarr(tmp_path / "d.zarr")
    table = adata.copy()
    table.obs["region"] = pd.Categorical(["cells"] * table.n_obs)
    table.obs["cell_id"] = np.arange(table.n_obs)
    circles = ShapesModel.parse(np.asarray(adata.obsm["spatial"], dtype=np.float64), geometry=0,
                                radius=np.ones(adata.n_obs), index=np.arange(adata.n_obs))
    tables = {"cells_table": TableModel.parse(table, region="cells", region_key="region", instance_key="cell_id")}
    with unsharded():
        sd.SpatialData(shapes={"cells": circles}, tables=tables).write(tmp_path / "s.zarr")
    for data in ("d.zarr", "s.zarr"):
        out = tmp_path / f"ft_{data}"
        assert main(["finetune", str(tmp_path / "pre"), str(tmp_path / data), "--out", str(out),
                     "--label-key", "cell_type", "--epochs", "1", "--no-progress"]) == 0, capsys.readouterr().err
        assert json.loads((out / "finetune.json").read_text())["classes"] == sorted(adata.obs["cell_type"].unique())


def test_finetune_callbacks_see_the_training_plan(starmap_small):
    import lightning as L

    seen = []

    class Record(L.Callback):
        def on_train_epoch_end(self, trainer, module):
            seen.append((trainer.current_epoch, module.head is not None, module.model.xpressor is not None))

    finetune(_model(starmap_small.var_names), starmap_small, task="cell_type", label_key="cell_type", max_epochs=2,
             batch_size=64, progress=False, callbacks=[Record()])
    assert seen == [(0, True, True), (1, True, True)]


@pytest.mark.parametrize("encoder", ["full", "criss-cross"])
def test_layer_mix_equals_naive_reference(encoder):
    """The Xpressor's input with a layer mix = norm(Σ softmax(w)_l · state_l), the states computed
    here layer by layer; weights all on the last layer give back the model without a mix."""
    torch.manual_seed(0)
    genes = [f"G{i}" for i in range(30)]
    model = GeneToCell(GeneToCellConfig.preset("tiny", genes=genes, depth=3, encoder=encoder)).eval()
    ids, values = torch.randint(0, 30, (5, 12)), torch.rand(5, 12)
    pad = torch.zeros(5, 12, dtype=torch.bool)
    pad[0, 7:] = True
    plain = model.encode(ids, values, pad).detach()
    model.add_layer_mix()
    assert model.config.xpressor_layer_mix and model.layer_mix.shape == (4,)
    with torch.no_grad():
        model.layer_mix.copy_(torch.tensor([0.3, -1.0, 2.0, 0.5]))
        tokens = model._tokens(ids, values, None, None)
        enc, states = model.encoder, [tokens]
        if encoder == "full":
            for attn, mlp in zip(enc.attn, enc.mlp, strict=True):
                states.append(mlp(attn(states[-1], pad)))
        else:
            lat = enc.latents.expand(5, -1, -1)
            for layer in enc.layers:
                x, lat = layer(states[-1], lat, pad)
                states.append(x)
        w = torch.softmax(model.layer_mix, 0)
        mixed = enc.norm(w[0] * states[0] + w[1] * states[1] + w[2] * states[2] + w[3] * states[3])
        torch.testing.assert_close(model.encode(ids, values, pad), model.xpressor(mixed, pad))
        model.layer_mix.copy_(torch.tensor([-1e4, -1e4, -1e4, 0.0]))
        torch.testing.assert_close(model.encode(ids, values, pad), plain)
    with pytest.raises(ValueError, match="xpressor_layer_mix needs pooling='xpressor'; got pooling='cls'"):
        GeneToCellConfig.preset("tiny", genes=genes, pooling="cls", xpressor_layer_mix=True)


def test_finetune_layer_mix_trains_mix_and_xpressor_only(starmap_small, tmp_path):
    adata = starmap_small
    res, changed = _finetune_left_half(adata, layer_mix=True, lr=1e-2, output_dir=tmp_path / "ft")
    state = res.model.state_dict()
    assert "layer_mix" in changed and all(k.startswith("xpressor.") or k == "layer_mix" for k in changed)
    assert not torch.allclose(state["layer_mix"], torch.zeros_like(state["layer_mix"]))  # moved from uniform
    head_n = sum(p.numel() for p in res.head.parameters())
    n_x = sum(p.numel() for p in res.model.xpressor.parameters()) + res.model.config.depth + 1 + head_n
    assert res.n_trainable == n_x
    reloaded = load_model(tmp_path / "ft" / "model")
    assert reloaded.config.xpressor_layer_mix
    np.testing.assert_allclose(encode_cells(reloaded, adata[:20]), encode_cells(res.model, adata[:20]), atol=1e-5)
    with pytest.raises(XscaleInputError, match="layer_mix=True feeds the Xpressor; this model pools with 'mean'"):
        finetune(_model(adata.var_names, pooling="mean"), adata, label_key="cell_type", layer_mix=True,
                 progress=False)


def test_cli_finetune_layer_mix(starmap_small, tmp_path, capsys):
    from xscale.cli.main import main

    save_model(_model(starmap_small.var_names), tmp_path / "pre")
    starmap_small.write_h5ad(tmp_path / "d.h5ad")
    rc = main(["finetune", str(tmp_path / "pre"), str(tmp_path / "d.h5ad"), "--out", str(tmp_path / "ft"),
               "--label-key", "cell_type", "--epochs", "1", "--layer-mix", "--ema-decay", "0.9", "--no-progress"])
    assert rc == 0
    assert load_model(tmp_path / "ft" / "model").config.xpressor_layer_mix
    assert json.loads((tmp_path / "ft" / "finetune.json").read_text())["ema_decay"] == 0.9
    assert not load_model(tmp_path / "pre").config.xpressor_layer_mix  # the pretrained model is untouched


def test_ema_weights_equal_naive_reference(starmap_small):
    """finetune(ema_decay=d) ends with e_T where e_1 = w_1, e_t = d·e_{t-1} + (1-d)·w_t over the
    weights w_t after each optimiser step (recorded here); mid-run, ``applied`` lends e_t and gives
    the current weights back."""
    import lightning as L

    from xscale.train.optim import EMAWeights

    decay, steps, lent = 0.8, [], []

    class Record(L.Callback):  # runs after the EMA callback (finetune puts the average first)
        def on_train_batch_end(self, trainer, module, *args):
            steps.append({k: p.detach().clone() for k, p in module.named_parameters() if p.requires_grad})
            ema = next(c for c in trainer.callbacks if isinstance(c, EMAWeights))
            before = {k: p.detach().clone() for k, p in module.named_parameters()}
            with ema.applied(module):
                lent.append({k: p.detach().clone() for k, p in module.named_parameters() if k in steps[-1]})
            assert all(torch.equal(p, before[k]) for k, p in module.named_parameters())

    res = finetune(_model(starmap_small.var_names), starmap_small, task="cell_type", label_key="cell_type",
                   max_epochs=2, batch_size=64, lr=1e-2, progress=False, ema_decay=decay, callbacks=[Record()])
    assert len(steps) >= 8
    ref = dict(steps[0])
    for t, w in enumerate(steps):
        if t:
            ref = {k: decay * ref[k] + (1 - decay) * w[k] for k in ref}
        for k in ref:
            torch.testing.assert_close(lent[t][k], ref[k])
    final = dict(res.model.named_parameters(prefix="model")) | dict(res.head.named_parameters(prefix="head"))
    assert set(ref) <= set(final) and any(k.startswith("head.") for k in ref)
    for k in ref:
        torch.testing.assert_close(final[k].detach(), ref[k])
    assert any(not torch.allclose(ref[k], steps[-1][k]) for k in ref)  # the average is not the last step
    with pytest.raises(XscaleInputError, match=r"ema_decay: expected a value in \(0, 1\) such as 0.98, found 1.5"):
        finetune(_model(starmap_small.var_names), starmap_small, label_key="cell_type", ema_decay=1.5, progress=False)


def test_thin_batch_equals_collating_thinned_cells():
    """thin_batch = draw a keep probability per cell, thin, and collate the thinned cells again (naive
    reference: collate_cells on items holding the thinned counts); keep 1 changes nothing."""
    from xscale.data.batch import CellItem, collate_cells, thin_batch

    rng = np.random.default_rng(0)
    items = [CellItem(gene_ids=np.arange(1, 1 + n), counts=rng.poisson(3.0, n).astype(np.float32), index=i, slide=i % 2)
             for i, n in enumerate([12, 12, 7, 12])]  # one shorter panel: padding
    batch = collate_cells(items)
    assert torch.equal(thin_batch(batch, 1.0).values, batch.values)
    thinned = thin_batch(batch, 0.3, generator=torch.Generator().manual_seed(1))
    assert (thinned.counts <= batch.counts).all() and thinned.counts[batch.pad_mask].eq(0).all()
    assert thinned.counts.sum() < batch.counts.sum()
    again = collate_cells([CellItem(gene_ids=it.gene_ids, counts=thinned.counts[i, : len(it.gene_ids)].numpy(),
                                    index=it.index, slide=it.slide) for i, it in enumerate(items)])
    for name in ("gene_ids", "counts", "pad_mask", "library", "index", "slide"):
        assert torch.equal(getattr(thinned, name), getattr(again, name)), name
    torch.testing.assert_close(thinned.values, again.values)
    # the keep probability is drawn per cell from [min_keep, 1]: large cells show it in their totals
    big = collate_cells([CellItem(gene_ids=np.arange(1, 41), counts=np.full(40, 500.0, np.float32), index=i)
                         for i in range(200)])
    share = thin_batch(big, 0.5, generator=torch.Generator().manual_seed(2)).library / big.library  # (200,)
    assert share.min() > 0.48 and share.max() <= 1.0 and 0.7 < share.mean() < 0.8  # uniform on [0.5, 1]: mean 0.75
    with pytest.raises(ValueError, match="min_keep"):
        thin_batch(batch, 0.0)


def test_thin_batch_scales_the_library_outside_a_sampled_context():
    from xscale.data.batch import CellItem, collate_cells, thin_batch

    items = [CellItem(gene_ids=np.arange(1, 101), counts=np.full(100, 10.0, np.float32), index=0)]
    batch = collate_cells(items, max_genes=40, rng=np.random.default_rng(0))  # 40 of 100 genes: library 1000
    assert batch.library.item() == 1000.0 and batch.counts.sum().item() == 400.0
    g = torch.Generator().manual_seed(3)
    thinned = thin_batch(batch, 0.5, generator=g)
    keep = 0.5 + 0.5 * torch.rand(1, 1, generator=torch.Generator().manual_seed(3))  # the same first draw
    expected = thinned.counts.sum() + 600.0 * keep[0, 0]
    torch.testing.assert_close(thinned.library[0], expected)


def test_finetune_with_thinning_trains_and_records_it(starmap_small, tmp_path, capsys):
    from xscale.cli.main import main

    res, changed = _finetune_left_half(starmap_small, thinning=0.5)
    assert changed and all(k.startswith(("xpressor.", "layer_mix")) for k in changed)
    plain, _ = _finetune_left_half(starmap_small)
    a, b = res.model.state_dict(), plain.model.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the augmentation changed what was learned
    with pytest.raises(XscaleInputError, match="thinning: expected"):
        finetune(_model(starmap_small.var_names), starmap_small, label_key="cell_type", thinning=1.5, progress=False)
    save_model(_model(starmap_small.var_names), tmp_path / "pre")
    starmap_small.write_h5ad(tmp_path / "d.h5ad")
    rc = main(["finetune", str(tmp_path / "pre"), str(tmp_path / "d.h5ad"), "--out", str(tmp_path / "ft"),
               "--label-key", "cell_type", "--epochs", "1", "--thinning", "0.5", "--no-progress"])
    assert rc == 0
    assert json.loads((tmp_path / "ft" / "finetune.json").read_text())["thinning"] == 0.5


def _structure_naive(f: torch.Tensor, r: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """structure_loss by a loop over ordered pairs of distinct cells of one group (rows centred per group,
    inner products over the reference's mean squared centred norm)."""
    fc, rc = f.clone(), r.clone()
    for g in set(groups.tolist()):
        fc[groups == g] -= f[groups == g].mean(0)
        rc[groups == g] -= r[groups == g].mean(0)
    scale = sum(float(rc[i] @ rc[i]) for i in range(len(r))) / len(r)
    terms = [((fc[i] @ fc[j] - rc[i] @ rc[j]) / scale) ** 2
             for i in range(len(f)) for j in range(len(f)) if i != j and groups[i] == groups[j]]
    return torch.stack(terms).mean() if terms else torch.zeros(())


def test_structure_loss_equals_naive_reference():
    from xscale.models.heads import structure_loss

    gen = torch.Generator().manual_seed(0)
    f, r = torch.randn(12, 3, 4, generator=gen), torch.randn(12, 12, generator=gen)
    groups = torch.tensor([0, 1, 2, 0, 1, 2, 0, 0, 1, 1, 2, 0])
    torch.testing.assert_close(structure_loss(f.flatten(1), r, groups), _structure_naive(f.flatten(1), r, groups))
    assert structure_loss(f.flatten(1), r, torch.arange(12)) == 0  # no pair within a group
    # moving a whole group does not count when its own similarities stay: rotate and shift group 1's features
    x = torch.randn(12, 6, generator=gen)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen))
    moved = torch.where((groups == 1)[:, None], x @ q + 3.0, x)
    assert structure_loss(moved, x, groups) < 1e-10 < structure_loss(moved, x, torch.zeros(12, dtype=torch.long))
    assert structure_loss(x + 5.0, x, groups) < 1e-10  # a shared shift: nothing changed within a group
    shrunk = float(structure_loss(0.01 * x, x, groups))  # a collapse onto one point costs (cosines would not see it)
    assert shrunk > 0.1 and shrunk == pytest.approx(float(_structure_naive(0.01 * x, x, groups)), rel=1e-5)


def _within_slide_change(model, reference, adata) -> float:
    """Mean squared change of within-slide cosine similarities of the cell latents (all cells)."""
    from xscale.models.heads import structure_loss

    z, z0 = (torch.from_numpy(encode_cells(m, adata).reshape(adata.n_obs, -1)) for m in (model, reference))
    slides = torch.from_numpy(adata.obs["slice"].astype("category").cat.codes.to_numpy().astype(np.int64))
    return float(structure_loss(z, z0, slides))


def test_finetune_structure_weight_keeps_within_slide_similarities(starmap_small, tmp_path):
    import warnings

    pre = _model(starmap_small.var_names)
    runs, spread = {}, {}
    for w in (0.0, 30.0):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = finetune(_model(starmap_small.var_names), starmap_small, task="batch_correction", slide_key="slice",
                           correction="mmd", correction_weight=1.0, structure_weight=w, max_epochs=3, batch_size=48,
                           lr=3e-3, progress=False, output_dir=tmp_path / f"w{w}")
        runs[w] = _within_slide_change(res.model, pre, starmap_small)
        spread[w] = (res.metrics["latent_spread_after"] / res.metrics["latent_spread_before"],
                     any("collapsed the cell latents" in str(c.message) for c in caught))
        doc = json.loads((tmp_path / f"w{w}" / "finetune.json").read_text())
        assert doc["correction"] == {"method": "mmd", "weight": 1.0, "structure_weight": w}
    assert runs[0.0] > 10 * runs[30.0], runs
    # this untrained model's decoder barely resists the penalty: alone, it collapses the latents (and says so)
    assert spread[0.0][0] < 0.1 and spread[0.0][1], spread
    assert spread[30.0][0] > 0.1 and not spread[30.0][1], spread
    with pytest.raises(XscaleInputError, match="structure_weight: only task='batch_correction'"):
        finetune(pre, starmap_small, task="cell_type", label_key="cell_type", structure_weight=1.0, progress=False)
    with pytest.raises(XscaleInputError, match="expected a weight >= 0, found -1"):
        finetune(pre, starmap_small, task="batch_correction", slide_key="slice", structure_weight=-1.0, progress=False)


def test_finetune_warns_when_the_correction_collapses_the_latents(starmap_small):
    import warnings

    from xscale.train.finetune_infer import check_correction, kept_neighbours

    metrics: dict = {}
    with pytest.warns(UserWarning, match=r"collapsed the cell latents.*lower correction_weight \(now 5\)"):
        check_correction(metrics, {"latent_spread": 0.4, "slide_mixing": 0.5},
                         {"latent_spread": 0.001, "slide_mixing": 0.2}, 5.0)
    assert metrics == {"latent_spread_before": 0.4, "latent_spread_after": 0.001,
                       "slide_mixing_before": 0.5, "slide_mixing_after": 0.2}
    metrics = {}
    with pytest.warns(UserWarning, match=r"reshuffled each slide's own neighbourhoods: on average 0.30 .*below 0.5"):
        check_correction(metrics, {"latent_spread": 0.4},
                         {"latent_spread": 0.3, "neighbourhood_preservation": 0.3}, 1.0)
    assert metrics["neighbourhood_preservation"] == 0.3
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # kept most neighbours, no collapse: silent
        check_correction({}, {"latent_spread": 0.4}, {"latent_spread": 0.3, "neighbourhood_preservation": 0.8}, 1.0)
    z = np.random.default_rng(0).normal(size=(40, 8))
    assert kept_neighbours(z, z, np.array(["a"] * 15 + ["b"] * 15 + ["c"] * 10)) == {}  # no slide above k=15 cells
    assert kept_neighbours(z, 2 * z + 1, np.array(["a"] * 16 + ["b"] * 24)) == {"neighbourhood_preservation": 1.0}
    res = finetune(_model(starmap_small.var_names), starmap_small, task="batch_correction", slide_key="slice",
                   correction="mmd", max_steps=2, batch_size=48, progress=False)
    assert 0.1 * res.metrics["latent_spread_before"] < res.metrics["latent_spread_after"]
    assert 0.5 < res.metrics["neighbourhood_preservation"] <= 1.0  # two small steps keep most neighbourhoods


def test_slide_correction_with_labels_scores_their_purity_before_and_after(starmap_small, tmp_path):
    """label_key on a slide correction: never trained on, the labelled cells' kNN purity recorded before and after
    (unlabelled cells left out), a warning on a drop of 0.02 or more, a clear error for a missing column."""
    import warnings

    from xscale.eval.metrics import knn_purity
    from xscale.train.finetune_infer import check_correction, latent_summary

    metrics: dict = {}
    with pytest.warns(UserWarning, match=r"mixed cell types: .* fell from 0.500 to 0.450, a drop of 0.050 >= 0.02"):
        check_correction(metrics, {"latent_spread": 0.4, "knn_purity": 0.5},
                         {"latent_spread": 0.35, "knn_purity": 0.45}, 1.0)
    assert metrics["knn_purity_before"] == 0.5 and metrics["knn_purity_after"] == 0.45
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a drop below 0.02: silent
        check_correction({}, {"latent_spread": 0.4, "knn_purity": 0.5}, {"latent_spread": 0.35, "knn_purity": 0.49},
                         1.0)

    model = _model(starmap_small.var_names)
    slides = starmap_small.obs["slice"].astype(str).to_numpy()
    labels = starmap_small.obs["cell_type"].astype(object).to_numpy().copy()
    labels[::3] = None  # unlabelled cells do not count
    summary, z = latent_summary(model, starmap_small, slides, labels=labels)
    known = pd.notna(labels)
    assert summary["knn_purity"] == pytest.approx(knn_purity(z[known], labels[known].astype(str), k=15))
    assert "knn_purity" not in latent_summary(model, starmap_small, slides)[0]

    plain = finetune(_model(starmap_small.var_names), starmap_small, task="batch_correction", slide_key="slice",
                     max_steps=2, batch_size=48, progress=False)
    scored = finetune(_model(starmap_small.var_names), starmap_small, task="batch_correction", slide_key="slice",
                      label_key="cell_type", max_steps=2, batch_size=48, progress=False, output_dir=tmp_path / "bc")
    assert 0 < scored.metrics["knn_purity_before"] <= 1 and 0 < scored.metrics["knn_purity_after"] <= 1
    assert "knn_purity_before" not in plain.metrics
    for name, p in plain.model.state_dict().items():  # the labels change nothing in training
        assert torch.equal(p, scored.model.state_dict()[name]), name
    doc = json.loads((tmp_path / "bc" / "finetune.json").read_text())
    assert doc["metrics"]["knn_purity_after"] == scored.metrics["knn_purity_after"]
    with pytest.raises(XscaleInputError, match=r"label_key 'celltype': expected an obs column of cell types.*"
                                               r"Available: \[.*'cell_type'"):
        finetune(_model(starmap_small.var_names), starmap_small, task="batch_correction", slide_key="slice",
                 label_key="celltype", max_steps=1, progress=False)


def test_cli_finetune_slide_correction_with_structure(starmap_small, tmp_path, capsys):
    from xscale.cli.main import main

    save_model(_model(starmap_small.var_names), tmp_path / "pre")
    starmap_small.write_h5ad(tmp_path / "d.h5ad")
    rc = main(["finetune", str(tmp_path / "pre"), str(tmp_path / "d.h5ad"), "--out", str(tmp_path / "bc"),
               "--task", "batch_correction", "--slide-key", "slice", "--correction", "mmd", "--structure-weight", "0.5",
               "--epochs", "1", "--no-progress"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[0])
    assert summary["latent_spread_before"] > 0 and summary["latent_spread_after"] > 0
    assert 0 < summary["slide_mixing_before"] <= 1 and 0 < summary["slide_mixing_after"] <= 1
    assert 0 <= summary["neighbourhood_preservation"] <= 1
    doc = json.loads((tmp_path / "bc" / "finetune.json").read_text())
    assert doc["correction"] == {"method": "mmd", "weight": 1.0, "structure_weight": 0.5}
    png = (tmp_path / "bc" / "correction.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000  # before / after, by slide
    assert doc["slides"] == sorted(set(starmap_small.obs["slice"].astype(str)))


def test_finetune_batch_correction_defaults_mmd_with_structure_term(starmap_small, tmp_path):
    res = finetune(_model(starmap_small.var_names), starmap_small, task="batch_correction", slide_key="slice",
                   max_steps=1, batch_size=48, progress=False, output_dir=tmp_path / "bc")
    doc = json.loads((tmp_path / "bc" / "finetune.json").read_text())
    assert doc["correction"] == {"method": "mmd", "weight": 1.0, "structure_weight": 1.0}
    assert res.metrics["latent_spread_after"] > 0
    res = finetune(_model(starmap_small.var_names), starmap_small, task="cell_type", label_key="cell_type",
                   max_steps=1, batch_size=48, progress=False, output_dir=tmp_path / "ct")
    doc = json.loads((tmp_path / "ct" / "finetune.json").read_text())
    assert doc["correction"] is None and "latent_spread_after" not in res.metrics


def test_slide_correction_keeps_reconstruction_in_its_loss(starmap_small, tmp_path):
    """batch_correction trains on correction + structure + reconstruction (weight 1 by default, the model's own NB
    loss): the step's loss is that weighted sum of the logged parts; reconstruction_weight=0 leaves it out, and
    finetune.json records the weight used."""
    import lightning as L

    class Parts(L.Callback):
        def __init__(self):
            self.steps = []

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.steps.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
                              | {"returned": float(outputs["loss"])})

    runs = {}
    for rec in (None, 0.0, 2.5):
        spy = Parts()
        finetune(_model(starmap_small.var_names), starmap_small, task="batch_correction", slide_key="slice",
                 reconstruction_weight=rec, correction_weight=3.0, structure_weight=0.5, max_steps=2, batch_size=48,
                 progress=False, callbacks=[spy], output_dir=tmp_path / str(rec))
        runs[rec] = spy.steps[-1]
        doc = json.loads((tmp_path / str(rec) / "finetune.json").read_text())
        assert doc["reconstruction_weight"] == (1.0 if rec is None else rec)
    for rec, w in ((None, 1.0), (2.5, 2.5)):
        p = runs[rec]
        assert p["train/reconstruction"] > 0
        expected = 3.0 * p["train/mmd"] + 0.5 * p["train/structure"] + w * p["train/reconstruction"]
        assert p["train/loss"] == pytest.approx(expected, rel=1e-5) and p["returned"] == pytest.approx(expected, 1e-5)
    off = runs[0.0]
    assert "train/reconstruction" not in off
    assert off["train/loss"] == pytest.approx(3.0 * off["train/mmd"] + 0.5 * off["train/structure"], rel=1e-5)
    with pytest.raises(XscaleInputError, match=r"reconstruction_weight: expected a weight >= 0, found -1"):
        finetune(_model(starmap_small.var_names), starmap_small, task="batch_correction", slide_key="slice",
                 reconstruction_weight=-1.0, max_steps=1, progress=False)


@pytest.mark.parametrize(("pooling", "mix", "encoder"),
                         [("xpressor", False, "full"), ("xpressor", True, "full"), ("xpressor", True, "criss-cross"),
                          ("mean", False, "full")])
def test_encoder_states_then_compress_equal_encode(pooling, mix, encoder):
    torch.manual_seed(0)
    genes = [f"G{i}" for i in range(30)]
    model = GeneToCell(GeneToCellConfig.preset("tiny", genes=genes, depth=2, encoder=encoder, pooling=pooling)).eval()
    if mix:
        model.add_layer_mix()
        with torch.no_grad():
            model.layer_mix.copy_(torch.tensor([0.3, -1.0, 2.0]))
    ids, values = torch.randint(0, 30, (5, 12)), torch.rand(5, 12)
    pad = torch.zeros(5, 12, dtype=torch.bool)
    pad[0, 7:] = True
    with torch.no_grad():
        states = model.encoder_states(ids, values, pad)
        assert len(states) == (3 if mix else 1)
        torch.testing.assert_close(model.compress(states, pad), model.encode(ids, values, pad), rtol=0, atol=0)
    with pytest.raises(ValueError, match=f"expected {3 if mix else 'the encoder'}"):
        model.compress(states + [states[0]], pad)
    cls = GeneToCell(GeneToCellConfig.preset("tiny", genes=genes, pooling="cls"))
    with pytest.raises(ValueError, match="CLS pooling reads its token out of the encoder"):
        cls.encoder_states(ids, values, pad)


def _correction_module(model, share: bool, reference=None):
    import copy

    from xscale.train.finetune_module import FinetuneModule

    reference = copy.deepcopy(model) if reference is None else reference
    return FinetuneModule(model, task="batch_correction", correction="mmd", reconstruction_weight=0.0,
                          structure_weight=2.0, reference=reference, share_encoder=share)


@pytest.mark.parametrize("mix", [False, True])
def test_shared_encoder_states_equal_the_reference_pass(starmap_small, mix):
    """With a frozen stem, the correction step computes the encoder states once for the model and
    its frozen copy: the same loss and gradients as running the copy's own pass (naive reference)."""
    import copy
    import warnings

    from xscale.data.batch import CellItem, collate_cells
    from xscale.train.finetune_module import frozen_stem

    genes = starmap_small.var_names
    counts = np.asarray(starmap_small.X[:24].todense() if hasattr(starmap_small.X, "todense") else starmap_small.X[:24])
    items = [CellItem(np.arange(len(genes)), c.astype(np.float32), i, 0, i % 3) for i, c in enumerate(counts)]
    batch = collate_cells(items)
    grads, losses = {}, {}
    for share in (True, False):
        model = _model(genes)
        if mix:
            model.add_layer_mix()
        set_trainable(model, None, "xpressor")
        reference = copy.deepcopy(model)
        with torch.no_grad():  # the Xpressor (and its mix) moved away from the reference since the start
            for p in model.xpressor.parameters():
                p.add_(0.05 * torch.randn_like(p))
            if mix:
                model.layer_mix.add_(torch.linspace(-1, 1, len(model.layer_mix)))
        module = _correction_module(model, share, reference)
        assert module.share_encoder is share and frozen_stem(model)
        module.reference.eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # self.log outside a Trainer
            loss = module.training_step(batch, 0)
        loss.backward()
        losses[share] = loss.detach()
        grads[share] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert losses[True] > 0
    torch.testing.assert_close(losses[True], losses[False])
    from xscale.models.heads import structure_loss

    with torch.no_grad():  # the model differs from its reference: the structure term is live
        z, z0 = (m.encode(batch.gene_ids, batch.values, batch.pad_mask).flatten(1) for m in (model, module.reference))
    assert float(structure_loss(z, z0, batch.slide)) > 1e-4
    assert grads[True].keys() == grads[False].keys() and any(k.startswith("xpressor.") for k in grads[True])
    for k in grads[True]:
        torch.testing.assert_close(grads[True][k], grads[False][k])


def test_frozen_stem_decides_whether_the_reference_shares_states(starmap_small):
    import lightning as L

    from xscale.train.finetune_module import frozen_stem

    model = _model(starmap_small.var_names)
    set_trainable(model, None, "all")
    assert not frozen_stem(model) and not _correction_module(model, True).share_encoder
    set_trainable(model, None, "xpressor")
    assert frozen_stem(model) and not _correction_module(model, False).share_encoder
    model.encoder.add_module("drop", torch.nn.Dropout(0.1))  # dropout before the bottleneck: states vary per pass
    assert not frozen_stem(model)
    assert not frozen_stem(_model(starmap_small.var_names, pooling="cls"))
    seen = []

    class Record(L.Callback):
        def on_train_start(self, trainer, module):
            seen.append(module.share_encoder)

    for trainable in ("xpressor", "all"):
        finetune(_model(starmap_small.var_names), starmap_small, task="batch_correction", slide_key="slice",
                 trainable=trainable, max_steps=1, batch_size=48, progress=False, callbacks=[Record()])
    assert seen == [True, False]


def test_correction_figure_shows_before_and_after_by_slide():
    from xscale.train.finetune_infer import correction_figure

    rng = np.random.default_rng(0)
    slides = np.repeat(["s1", "s2", "s3"], 40)
    before = rng.normal(size=(120, 16)) + np.repeat(np.eye(3, 16) * 6, 40, axis=0)  # slides apart
    after = rng.normal(size=(120, 16))  # slides mixed
    metrics = {"slide_mixing_before": 0.1, "slide_mixing_after": 0.9, "neighbourhood_preservation": 0.42}
    fig = correction_figure(before, after, slides, metrics)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["before: slide mixing 0.10", "after: slide mixing 0.90, kept neighbours 0.42"]
    legend = fig.axes[1].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["s1", "s2", "s3"]
    assert sum(len(c.get_offsets()) for c in fig.axes[0].collections) == 120
    fig = correction_figure(before, after, slides, {**metrics, "knn_purity_before": 0.61, "knn_purity_after": 0.58})
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["before: slide mixing 0.10\ncell-type purity 0.61",
                      "after: slide mixing 0.90, kept neighbours 0.42\ncell-type purity 0.58"]
    types = np.array(["A", "B", None] * 40, dtype=object)  # a second row by cell type, unlabelled in grey
    fig = correction_figure(before, after, slides, metrics, cell_types=types)
    assert len(fig.axes) == 4
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    assert [lg.get_title().get_text() for lg in legends] == ["slide", "cell type"]
    assert [t.get_text() for t in legends[1].get_texts()] == ["A", "B", "unlabelled"]
    assert sum(len(c.get_offsets()) for c in fig.axes[2].collections) == 120
