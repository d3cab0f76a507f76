"""Gene embedders backed by a table file or a (tiny, random, local) ESM-2 protein language model."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from xscale.errors import XscaleInputError
from xscale.models.gene_embedders import build_gene_embedder
from xscale.models.plm import ProteinLMGeneEmbedder, TableGeneEmbedder, read_gene_table, save_gene_table

GENES = ["GAD1", "SLC17A7", "PVALB", "SST", "VIP", "OLIG2"]


@pytest.mark.parametrize("suffix", [".npz", ".tsv", ".safetensors"])
def test_table_embedder_reads_each_format_with_fallback(tmp_path, suffix, caplog):
    rng = np.random.default_rng(0)
    table_genes = ["gad1", "Slc17a7", "PVALB", "SST", "EXTRA"]  # case differs; VIP, OLIG2 missing
    vectors = rng.normal(size=(5, 7)).astype(np.float32)
    path = tmp_path / f"table{suffix}"
    if suffix == ".tsv":
        rows = ["symbol\t" + "\t".join(f"d{i}" for i in range(7))]
        rows += [g + "\t" + "\t".join(f"{x:.7f}" for x in v) for g, v in zip(table_genes, vectors, strict=True)]
        path.write_text("\n".join(rows) + "\n")
    else:
        save_gene_table(path, table_genes, vectors)
    symbols, read = read_gene_table(path)
    assert symbols == table_genes
    np.testing.assert_allclose(read, vectors, atol=1e-6)

    with caplog.at_level("INFO", logger="xscale.models.plm"):
        emb = build_gene_embedder("table", n_genes=len(GENES), dim=12, genes=GENES, options={"path": str(path)})
    assert isinstance(emb, TableGeneEmbedder)
    assert emb.n_missing == 2 and "2 of 6 genes missing" in caplog.text
    np.testing.assert_allclose(emb.table.detach().numpy(), vectors[:4], atol=1e-6)
    ids = torch.tensor([[0, 1, 5], [3, 4, 0]])
    out = emb(ids)
    assert out.shape == (2, 3, 12)
    torch.testing.assert_close(out[0, 0], out[1, 2])  # same gene, same token
    out.sum().backward()
    assert emb.table.grad is None  # frozen by default
    assert emb.fallback.grad is not None and emb.fallback.grad.abs().sum() > 0
    assert all(p.grad is not None for p in emb.adapter.parameters())


def test_table_embedder_unfrozen_and_errors(tmp_path):
    path = save_gene_table(tmp_path / "t.npz", GENES, np.ones((6, 4), np.float32) * np.arange(6)[:, None])
    emb = TableGeneEmbedder(6, 8, GENES, path=str(path), freeze=False, adapter="mlp")
    emb(torch.tensor([[0, 2]])).sum().backward()
    assert emb.table.grad is not None and emb.table.grad[[0, 2]].abs().sum() > 0
    assert emb.table.grad[[1, 3, 4, 5]].abs().sum() == 0
    with pytest.raises(XscaleInputError, match="None of the 2 vocabulary genes"):
        TableGeneEmbedder(2, 8, ["FOO", "BAR"], path=str(path))
    with pytest.raises(XscaleInputError, match="does not exist"):
        TableGeneEmbedder(6, 8, GENES, path=str(tmp_path / "nope.npz"))
    np.savez(tmp_path / "bad.npz", symbols=np.array(GENES), vectors=np.zeros((6, 4)))
    with pytest.raises(XscaleInputError, match="'genes' and 'embeddings'"):
        TableGeneEmbedder(6, 8, GENES, path=str(tmp_path / "bad.npz"))


def _plm(write_fasta, tiny_esm_dir, tmp_path, n_trainable_layers=0, **kw) -> ProteinLMGeneEmbedder:
    fasta = write_fasta(tmp_path / "proteins.fasta", GENES)
    return build_gene_embedder(
        "protein-lm", n_genes=len(GENES), dim=10, genes=GENES,
        options={"model_dir": str(tiny_esm_dir), "fasta": str(fasta), "n_trainable_layers": n_trainable_layers, **kw},
    )


def test_plm_shapes_and_mean_pooling_ignores_padding(tiny_esm_dir, tmp_path, fasta_writer):
    emb = _plm(fasta_writer, tiny_esm_dir, tmp_path, chunk_size=4)
    out = emb(torch.tensor([[0, 1, 2, 3], [5, 4, 0, 0]]))
    assert out.shape == (2, 4, 10)
    torch.testing.assert_close(out[0, 0], out[1, 2])
    emb.plm.eval()
    with torch.no_grad():
        together = emb.protein_vectors(torch.arange(6))  # padded to the longest of each chunk
        alone = torch.cat([emb.protein_vectors(torch.tensor([i])) for i in range(6)])
    assert together.shape == (6, 16)
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(together[0], together[1])


def test_plm_frozen_caches_protein_vectors(tiny_esm_dir, tmp_path, fasta_writer):
    emb = _plm(fasta_writer, tiny_esm_dir, tmp_path)
    calls = []
    emb.plm.register_forward_hook(lambda *a: calls.append(1))
    ids = torch.tensor([[0, 1, 2]])
    first = emb(ids)
    n_calls = len(calls)
    assert n_calls >= 1 and emb.cache.shape == (6, 16)
    second = emb(ids)
    assert len(calls) == n_calls  # served from the cache
    torch.testing.assert_close(first, second)
    first.sum().backward()
    assert all(p.grad is None for p in emb.plm.parameters())
    assert emb.adapter[1].weight.grad is not None
    emb.load_state_dict(emb.state_dict())
    assert emb.cache.numel() == 0  # new weights invalidate the cache


def test_plm_gradients_reach_exactly_the_unfrozen_layers(tiny_esm_dir, tmp_path, fasta_writer):
    emb = _plm(fasta_writer, tiny_esm_dir, tmp_path, n_trainable_layers=1)
    emb.train()
    calls = []
    emb.plm.register_forward_hook(lambda *a: calls.append(1))
    emb(torch.tensor([[0, 1, 2], [3, 0, 1]])).pow(2).sum().backward()
    emb(torch.tensor([[0, 1, 2]]))
    assert len(calls) == 2  # trainable layers: recomputed each step, never cached
    with_grad = {n for n, p in emb.plm.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    trainable = {n for n, p in emb.plm.named_parameters() if p.requires_grad}
    expected = {n for n, _ in emb.plm.named_parameters()
                if n.startswith("encoder.layer.2.") or n.startswith("encoder.emb_layer_norm_after.")}
    assert trainable == expected
    assert with_grad == expected
    # Inference in eval mode without gradients uses (and fills) the cache, and agrees with the live path.
    emb.eval()
    live = emb(torch.tensor([[4, 5]]))
    with torch.no_grad():
        cached = emb(torch.tensor([[4, 5]]))
    assert emb.cache.shape[0] == 6
    torch.testing.assert_close(live.detach(), cached, atol=1e-5, rtol=1e-4)


def test_plm_missing_sequences_error_and_learned(tiny_esm_dir, tmp_path, fasta_writer):
    fasta = fasta_writer(tmp_path / "partial.fasta", GENES[:4], uniprot=False)
    with pytest.raises(XscaleInputError) as err:
        ProteinLMGeneEmbedder(6, 10, GENES, model_dir=str(tiny_esm_dir), fasta=str(fasta))
    msg = str(err.value)
    assert "VIP" in msg and "OLIG2" in msg and "missing_sequences='learned'" in msg and "GAD1" not in msg
    emb = ProteinLMGeneEmbedder(6, 10, GENES, model_dir=str(tiny_esm_dir), fasta=str(fasta),
                                missing_sequences="learned")
    assert emb.n_proteins == 4 and emb.fallback.shape == (2, 16)
    out = emb(torch.tensor([[0, 4, 5]]))
    out.sum().backward()
    assert emb.fallback.grad is not None and emb.fallback.grad.abs().sum() > 0
    with pytest.raises(XscaleInputError, match="no ESM-2 model"):
        ProteinLMGeneEmbedder(6, 10, GENES, model_dir=str(tmp_path), fasta=str(fasta))


def _synthetic_batch(n_cells: int = 6, n_genes: int = 6):
    from xscale.data.batch import CellItem, collate_cells

    rng = np.random.default_rng(0)
    items = []
    for i in range(n_cells):
        g = rng.choice(n_genes, size=int(rng.integers(3, n_genes + 1)), replace=False)
        items.append(CellItem(gene_ids=np.sort(g), counts=rng.poisson(3.0, size=len(g)).astype(np.float32), index=i))
    return collate_cells(items, rng=rng)


@pytest.mark.parametrize("embedder", ["table", "protein-lm"])
def test_gene_to_cell_training_step_with_external_gene_tokens(embedder, tmp_path, tiny_esm_dir, fasta_writer):
    from xscale.models.gene_to_cell import GeneToCell, GeneToCellConfig
    from xscale.models.io import load_model, save_model

    if embedder == "table":
        path = save_gene_table(tmp_path / "t.npz", GENES[:5], np.random.default_rng(0).normal(size=(5, 9)))
        options = {"path": str(path), "freeze": True}
        watched = "gene_embedder.adapter.1.weight"
    else:
        fasta = fasta_writer(tmp_path / "p.fasta", GENES)
        options = {"model_dir": str(tiny_esm_dir), "fasta": str(fasta), "n_trainable_layers": 1}
        watched = "gene_embedder.plm.encoder.layer.2.attention.self.query.weight"
    cfg = GeneToCellConfig.preset("tiny", genes=GENES, gene_embedder=embedder, gene_embedder_options=options)
    model = GeneToCell(cfg)
    params = dict(model.named_parameters())
    before = params[watched].detach().clone()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = _synthetic_batch()
    loss = model.loss(batch).total
    assert torch.isfinite(loss)
    loss.backward()
    assert params[watched].grad is not None and params[watched].grad.abs().sum() > 0
    opt.step()
    assert not torch.equal(before, params[watched].detach())
    if embedder == "protein-lm":
        assert params["gene_embedder.plm.encoder.layer.0.attention.self.query.weight"].grad is None
    # Save -> load keeps the (partly fine-tuned) gene tokens.
    model.eval()
    save_model(model, tmp_path / "m")
    again = load_model(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(model.embed(batch.gene_ids, batch.values, batch.pad_mask),
                                   again.embed(batch.gene_ids, batch.values, batch.pad_mask))


def test_plm_and_table_inputs_give_clear_errors(tiny_esm_dir, tmp_path, fasta_writer):
    """Inputs found to fail badly: another model kind loaded as a random ESM, a missing tokenizer was a
    TypeError, an object-dtype genes array a pickle ValueError, ragged per-gene tensors a stack error, a
    FASTA folder an IsADirectoryError, and a record of only '*' an all-zero protein vector."""
    import json
    import shutil

    from safetensors.numpy import save_file

    from xscale.models.plm import read_fasta

    fasta = fasta_writer(tmp_path / "p.fasta", GENES)
    other = tmp_path / "bert"
    shutil.copytree(tiny_esm_dir, other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "model_type": "bert"}))
    with pytest.raises(XscaleInputError, match="expected an ESM-2 model .* found model_type 'bert'"):
        ProteinLMGeneEmbedder(n_genes=6, dim=8, genes=GENES, model_dir=str(other), fasta=str(fasta))
    notok = tmp_path / "notok"
    shutil.copytree(tiny_esm_dir, notok)
    (notok / "vocab.txt").unlink()
    with pytest.raises(XscaleInputError, match=r"expected the ESM tokenizer beside the model \(vocab.txt\)"):
        ProteinLMGeneEmbedder(n_genes=6, dim=8, genes=GENES, model_dir=str(notok), fasta=str(fasta))
    with pytest.raises(XscaleInputError, match="expected a protein FASTA file, found a directory"):
        read_fasta(tmp_path)
    (tmp_path / "stop.fasta").write_text(">GAD1\nMKT\n>SST\n*\n")
    assert read_fasta(tmp_path / "stop.fasta") == {"GAD1": "MKT"}  # SST has no sequence: a missing gene

    np.savez(tmp_path / "obj.npz", genes=np.array(GENES, dtype=object), embeddings=np.ones((6, 4)))
    with pytest.raises(XscaleInputError, match="'genes' is an object array.*np.asarray\\(genes, dtype=str\\)"):
        read_gene_table(tmp_path / "obj.npz")
    save_file({"GAD1": np.ones(4, np.float32), "SST": np.ones(5, np.float32)}, str(tmp_path / "ragged.safetensors"))
    with pytest.raises(XscaleInputError, match=r"different widths \[4, 5\]"):
        read_gene_table(tmp_path / "ragged.safetensors")
    (tmp_path / "pandas.tsv").write_text("\t0\t1\nGAD1\t1.0\t2.0\nSST\t3.0\t4.0\n")  # DataFrame.to_csv(sep="\t")
    assert read_gene_table(tmp_path / "pandas.tsv")[0] == ["GAD1", "SST"]


def test_saved_model_with_file_options_loads_from_another_directory(tiny_esm_dir, tmp_path, fasta_writer,
                                                                    monkeypatch):
    """Relative model_dir / fasta / path were saved as given: the model loaded only from the same cwd."""
    import shutil

    from xscale.models.gene_to_cell import GeneToCell, GeneToCellConfig
    from xscale.models.io import load_model, save_model

    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(tiny_esm_dir, work / "esm")
    fasta_writer(work / "p.fasta", GENES)
    monkeypatch.chdir(work)
    cfg = GeneToCellConfig.preset("tiny", genes=GENES, gene_embedder="protein-lm",
                                  gene_embedder_options={"model_dir": "esm", "fasta": "p.fasta"})
    assert cfg.gene_embedder_options == {"model_dir": str(work / "esm"), "fasta": str(work / "p.fasta")}
    save_model(GeneToCell(cfg), tmp_path / "m")
    monkeypatch.chdir(tmp_path)
    assert type(load_model(tmp_path / "m")).__name__ == "GeneToCell"


def test_table_model_keeps_its_gene_map_when_the_file_changes(tmp_path, caplog):
    """The gene -> row map was rebuilt from the file at load time while the vectors came from the
    checkpoint: a file that still matched as many genes, but other ones, gave every gene another
    gene's trained vector without a word. The map is now saved with the weights."""
    import logging

    from xscale.models.gene_to_cell import GeneToCell, GeneToCellConfig
    from xscale.models.io import load_model, save_model

    rng = np.random.default_rng(0)
    path = tmp_path / "t.npz"
    save_gene_table(path, GENES[:5], rng.normal(size=(5, 6)))  # OLIG2 missing
    cfg = GeneToCellConfig.preset("tiny", genes=GENES, gene_embedder="table", gene_embedder_options={"path": str(path)})
    model = GeneToCell(cfg).eval()
    before = model.gene_embedder.gene_vectors().detach().clone()
    save_model(model, tmp_path / "m")
    save_gene_table(path, GENES[1:], rng.normal(size=(5, 6)))  # now GAD1 missing: as many found, other genes
    with caplog.at_level(logging.WARNING, logger="xscale.models.plm"):
        loaded = load_model(tmp_path / "m")
    torch.testing.assert_close(loaded.gene_embedder.gene_vectors().detach(), before, rtol=0, atol=0)
    assert "maps genes to rows differently" in caplog.text


def test_read_fasta_reads_gzip_and_says_what_is_wrong_with_binary(tmp_path):
    """UniProt serves FASTA gzip-compressed: read as is; bytes that are not text get a message naming the file."""
    import gzip

    from xscale.errors import XscaleInputError
    from xscale.models.gene_files import read_fasta

    text = ">sp|P1|X_HUMAN Protein OS=Homo sapiens GN=Gad1 PE=1\nMKV\nLL*\n>sp|P2|Y GN=SST\nMAA\n"
    (tmp_path / "p.fasta.gz").write_bytes(gzip.compress(text.encode()))
    assert read_fasta(tmp_path / "p.fasta.gz") == {"GAD1": "MKVLL", "SST": "MAA"}
    (tmp_path / "bad.fasta").write_bytes(b">x\n\xff\xfe\x00")
    with pytest.raises(XscaleInputError, match=r"bad.fasta'.*expected a text \(or gzip-compressed\) protein FASTA"):
        read_fasta(tmp_path / "bad.fasta")


def test_table_model_loads_after_its_table_file_has_moved(tmp_path, caplog):
    """The table's vectors are saved with the weights, yet loading needed the file (to learn its shape): a moved
    file made a saved model unloadable. It now loads from its own copy, with a warning; a new model still needs
    the file."""
    import logging

    from xscale.models.gene_to_cell import GeneToCell, GeneToCellConfig
    from xscale.models.io import load_model, save_model

    path = tmp_path / "t.npz"
    save_gene_table(path, GENES[:5], np.random.default_rng(0).normal(size=(5, 6)))
    cfg = GeneToCellConfig.preset("tiny", genes=GENES, gene_embedder="table", gene_embedder_options={"path": str(path)})
    model = GeneToCell(cfg).eval()
    save_model(model, tmp_path / "m")
    path.rename(tmp_path / "moved.npz")
    with caplog.at_level(logging.WARNING, logger="xscale.models.plm"):
        loaded = load_model(tmp_path / "m")
    assert "the model's own copy of the table" in caplog.text
    torch.testing.assert_close(loaded.gene_embedder.gene_vectors(), model.gene_embedder.gene_vectors(), rtol=0, atol=0)
    with pytest.raises(XscaleInputError, match="t.npz"):
        GeneToCell(cfg)
