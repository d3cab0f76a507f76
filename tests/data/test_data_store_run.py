"""``xscale run --data STORE``: both levels trained from a prepared store block by block, the latents and
domains written into the store, finished stages skipped on re-run, stale ones refused."""
from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pytest

import xscale
from xscale.cli.main import main
from xscale.data.prepare import prepare
from xscale.data.store import CellStore
from xscale.errors import XscaleInputError
from xscale.train.store_run import run_store


@pytest.fixture
def store(tmp_path):
    """STARmap (3 slices, 3190 cells) in blocks of 500 cells."""
    return prepare(xscale.datasets.path("starmap_mpfc"), tmp_path / "starmap.zarr", slide_key="slice",
                   chunk_cells=500, progress=False)


def test_run_on_a_store_reads_it_block_by_block_and_writes_results_into_it(store, tmp_path, monkeypatch):
    spans = []
    read_rows = CellStore.read_rows

    def reading(self, start, stop):
        spans.append(stop - start)
        return read_rows(self, start, stop)

    def whole(self, *a, **k):
        raise AssertionError("a whole-store read")

    with monkeypatch.context() as m:
        m.setattr(CellStore, "read_rows", reading)
        for name in ("graph", "coords"):  # the whole neighbour graph / all coordinates at once
            m.setattr(CellStore, name, whole)
        m.setattr(ad, "read_zarr", whole)  # the whole store as an AnnData
        result = run_store(store, tmp_path / "run", level1_preset="tiny", level2_preset="tiny", n_domains=4,
                           level1_max_steps=30, level2_max_steps=10, batch_size=64, progress=False)
    assert spans and max(spans) <= 500  # never more than a block of counts at a time
    assert result.skipped == [] and set(result.seconds) == {"level1", "cells", "level2", "niches"}

    cells = ad.read_zarr(store)
    k1 = result.level1.config.embedding_dim
    assert cells.obsm["X_xscale_cell"].shape == (3190, k1) and np.isfinite(cells.obsm["X_xscale_cell"]).all()
    assert cells.obsm["X_xscale_niche"].shape[0] == 3190 and np.isfinite(cells.obsm["X_xscale_niche"]).all()
    assert cells.obs["xscale_domain"].nunique() == 4
    # the store's latents are those of the trained model (in store order)
    import xscale.tl as tl

    again = tl.embed_cells(cells, result.level1, copy=True, progress=False).obsm["X_xscale_cell"]
    np.testing.assert_allclose(cells.obsm["X_xscale_cell"], again, atol=1e-5)


def test_rerun_skips_finished_stages_and_refuses_stale_ones(store, tmp_path):
    kw = dict(level1_preset="tiny", level2_preset="tiny", n_domains=3, level1_max_steps=5, level2_max_steps=3,
              batch_size=64, progress=False)
    run_store(store, tmp_path / "run", **kw)
    before = np.asarray(ad.read_zarr(store).obsm["X_xscale_niche"])
    again = run_store(store, tmp_path / "run", **kw)
    assert again.skipped == ["level1", "cells", "level2", "niches"]
    np.testing.assert_array_equal(np.asarray(ad.read_zarr(store).obsm["X_xscale_niche"]), before)
    assert json.loads((tmp_path / "run" / "stages.json").read_text())["skipped"] == again.skipped
    with pytest.raises(XscaleInputError, match=r"Stage 'level1' .* finished with other settings \(level1_max_steps"):
        run_store(store, tmp_path / "run", **{**kw, "level1_max_steps": 6})


def test_cli_run_on_a_store(store, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--data", str(store), "--out", str(out), "--preset", "tiny", "--max-steps", "3",
                 "--n-domains", "3", "--cell-type-key", "nope", "--no-progress"]) == 2
    assert "--cell-type-key 'nope' not found in obs of the store. Available: ['slice'" in capsys.readouterr().err
    assert not (out / "checkpoints").exists()  # refused before any training
    assert main(["run", "--data", str(store), "--out", str(out), "--preset", "tiny", "--max-steps", "3",
                 "--n-domains", "3", "--cell-type-key", "cell_type", "--domain-key", "domain", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["scored_cells"]["n"] == metrics["scored_cells"]["of"] == 3190
    assert set(metrics["summary"]) >= {"knn_purity_xscale_cell", "knn_purity_pca", "domain_ari_xscale_domain"}
    assert "written into the prepared store (out of core)" in printed and "report.html: open it" in printed
    assert ad.read_zarr(store).obs["xscale_domain"].nunique() == 3
    html = (out / "report.html").read_text()
    assert "No decoded expression" not in html and "No slide was held out" in html
    assert html.count("data:image/png;base64,") >= 5  # domains, 2 latent maps, decoded maps, correlations (+ curves)
    assert "alt=\"spatial maps of annotated and predicted domains\"" in html
    assert main(["run", "--data", str(store), "--out", str(out), "--slide-key", "slice", "--radius", "2"]) == 2
    err = capsys.readouterr().err
    assert "is a prepared store: expected none of --slide-key, --radius, found them" in err


def test_cli_run_on_a_store_prepared_from_spatialdata_writes_back_into_it(small_adata, write_spatialdata, tmp_path,
                                                                          capsys):
    """``xscale run --data STORE --write-back``: trained out of core, then the cell latents, the domains and the niche
    latents go into the SpatialData store the store was prepared from, in the table's row order (missing for a cell
    dropped at validation); a store prepared from an .h5ad is refused before any training."""
    import spatialdata as sd

    from xscale.data.writeback import latents_in_source_order

    x = small_adata.X.tolil()
    x[4] = 0  # dropped when the store is prepared
    small_adata.X = x.tocsr()
    path = write_spatialdata(small_adata, tmp_path / "x.sdata.zarr")
    with pytest.warns(UserWarning, match="Dropped 1 of 300 cells"):
        cells = CellStore(prepare(path, tmp_path / "x.xscale.zarr", slide_key="slice", chunk_cells=64,
                                  progress=False))
    args = ["run", "--data", str(cells.path), "--out", str(tmp_path / "run"), "--preset", "tiny", "--max-steps", "2",
            "--n-domains", "3", "--no-report", "--no-progress", "--write-back"]
    assert main(args) == 0
    assert "the domains and a niche table into" in capsys.readouterr().out
    table = sd.read_zarr(path).tables["table"]
    lat = np.asarray(table.obsm["X_xscale_cell"])
    np.testing.assert_array_equal(lat, latents_in_source_order(cells, "X_xscale_cell", small_adata.n_obs))
    domains = table.obs["xscale_domain"]
    store_domains = ad.read_zarr(cells.path).obs["xscale_domain"].astype(str).to_numpy()
    assert domains.isna().to_numpy()[4] and domains.notna().sum() == cells.n_cells
    np.testing.assert_array_equal(domains.astype(str).to_numpy()[cells.source_index()], store_domains)
    assert sd.read_zarr(path).tables["table_niches"].shape[0] == small_adata.n_obs

    with pytest.warns(UserWarning, match="Dropped 1 of 300 cells"):
        small_adata.write_h5ad(tmp_path / "x.h5ad")
        other = prepare(tmp_path / "x.h5ad", tmp_path / "h.xscale.zarr", slide_key="slice", progress=False)
    assert main([*args[:2], str(other), "--out", str(tmp_path / "run2"), *args[5:]]) == 2
    assert "a prepared store made from" in capsys.readouterr().err
    assert not (tmp_path / "run2" / "checkpoints").exists()  # refused before any training


def test_store_domains_equal_in_memory_domains_and_sample_beyond_fit_cells(store, tmp_path):
    """Block by block, the clustering of xscale.tl.domains: the same labels when every cell is fitted; fitted on a
    sample, nearly the same partition."""
    from sklearn.metrics import adjusted_rand_score

    from xscale.data.writeback import read_store_latents
    from xscale.tl.niches import cluster_domains
    from xscale.train.store_run import store_domains

    run_store(store, tmp_path / "run", level1_preset="tiny", level2_preset="tiny", level1_max_steps=5,
              level2_max_steps=5, batch_size=64, progress=False)
    cs = CellStore(store)
    niches = np.asarray(read_store_latents(cs, "X_xscale_niche")[:], dtype=np.float64)
    slides = cs.slide_names[cs.slide_codes()]
    for centre in (False, True):
        want = cluster_domains(niches, 5, seed=0, groups=slides if centre else None)
        got = store_domains(cs, 5, slide_center=centre, seed=0)
        assert adjusted_rand_score(want, got) == 1.0
        assert (ad.read_zarr(store).obs["xscale_domain"].astype(int).to_numpy() == got).all()
    sampled = store_domains(cs, 5, seed=0, fit_cells=1600)
    assert adjusted_rand_score(want, sampled) > 0.7  # fitted on half the cells (latents of a 5-step model)
    with pytest.raises(XscaleInputError, match=r"n_domains: expected a whole number in 1..3190"):
        store_domains(cs, 0)


def test_store_sample_reads_the_drawn_cells(store, tmp_path):
    from xscale.train.store_run import store_sample

    run_store(store, tmp_path / "run", level1_preset="tiny", level2_preset="tiny", level1_max_steps=3,
              level2_max_steps=3, batch_size=64, progress=False)
    whole = ad.read_zarr(store)
    sample = store_sample(store, 700, seed=1)
    rows = whole.obs_names.get_indexer(sample.obs_names)
    assert sample.n_obs == 700 and (np.diff(rows) > 0).all()  # distinct cells, in store order
    np.testing.assert_array_equal(sample.X.toarray(), whole.X[rows].toarray())
    for key in ("spatial", "X_xscale_cell", "X_xscale_niche"):
        np.testing.assert_array_equal(sample.obsm[key], np.asarray(whole.obsm[key])[rows])
    assert (sample.obs["slide"].astype(str).to_numpy() == whole.obs["slice"].astype(str).to_numpy()[rows]).all()
    assert store_sample(store, 10_000).n_obs == 3190


def test_cli_domains_on_a_prepared_store_reads_only_its_latents(store, tmp_path, capsys, monkeypatch):
    from xscale.train.store_run import store_domains

    run_store(store, tmp_path / "run", level1_preset="tiny", level2_preset="tiny", level1_max_steps=3,
              level2_max_steps=3, batch_size=64, progress=False)
    want = store_domains(store, 4, key_added="check", seed=0)
    capsys.readouterr()

    def whole(*a, **k):
        raise AssertionError("the whole store read")

    with monkeypatch.context() as m:
        m.setattr(ad, "read_zarr", whole)
        assert main(["domains", "--store", str(store), "--n-domains", "4", "--key-added", "dom4",
                     "--label-key", "domain"]) == 0
        printed = capsys.readouterr().out
        assert main(["domains", "--store", str(store), "--n-domains", "4", "--slide-key", "slice"]) == 2
        err = capsys.readouterr().err
        assert "--slide-key: " in err and "slides are fixed by xscale prepare" in err
    assert "latents centred per slide of the store (3 slides)" in printed and "against domain (" in printed
    assert "wrote obs['dom4'] into" in printed
    back = ad.read_zarr(store)
    assert (back.obs["dom4"].astype(int).to_numpy() == want).all()


def test_cli_domains_out_on_a_prepared_store_copies_it_and_clusters_the_copy(store, tmp_path, capsys, monkeypatch):
    """--out with a prepared store: a prepared-store copy with the domains, made without reading the store whole;
    the source is untouched; a failure leaves neither the copy nor a temporary beside it."""
    from xscale.data.store import is_prepared_store
    from xscale.train.store_run import store_domains

    run_store(store, tmp_path / "run", level1_preset="tiny", level2_preset="tiny", level1_max_steps=3,
              level2_max_steps=3, batch_size=64, progress=False)
    before = ad.read_zarr(store)
    out = tmp_path / "copy.zarr"

    def whole(*a, **k):
        raise AssertionError("the whole store read")

    def failing(*a, **k):
        raise RuntimeError("disk full")

    with monkeypatch.context() as m:
        m.setattr(ad, "read_zarr", whole)
        m.setattr("xscale.train.store_run.store_domains", failing)
        with pytest.raises(RuntimeError, match="disk full"):
            main(["domains", "--store", str(store), "--out", str(out), "--n-domains", "4"])
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("copy")) == []
    with monkeypatch.context() as m:
        m.setattr(ad, "read_zarr", whole)
        assert main(["domains", "--store", str(store), "--out", str(out), "--n-domains", "4", "--key-added", "dom4",
                     "--label-key", "domain"]) == 0
        printed = capsys.readouterr().out
        assert main(["domains", "--store", str(store), "--out", str(store), "--n-domains", "4"]) == 2
        assert "is --store itself; expected a new path" in capsys.readouterr().err
        assert main(["domains", "--store", str(store), "--out", str(tmp_path / "c2.zarr"), "--n-domains", "4",
                     "--use-rep", "X_nope"]) == 2
        assert "--use-rep 'X_nope' not in the store's obsm" in capsys.readouterr().err
    assert not (tmp_path / "c2.zarr").exists()
    assert f"wrote {out}: a copy of {store} with obs['dom4']" in printed and "against domain (" in printed
    assert is_prepared_store(out)
    copy, source = ad.read_zarr(out), ad.read_zarr(store)
    assert "dom4" not in source.obs and list(source.obs.columns) == list(before.obs.columns)
    np.testing.assert_array_equal(copy.X.toarray(), source.X.toarray())
    np.testing.assert_array_equal(copy.obsm["X_xscale_niche"], source.obsm["X_xscale_niche"])
    expected = store_domains(store, 4, key_added="dom4", seed=0)  # the same clustering, written into the source
    assert (copy.obs["dom4"].astype(int).to_numpy() == expected).all()


def test_store_run_interrupted_while_embedding_resumes_the_missing_blocks(store, tmp_path, monkeypatch,
                                                                         interrupt_after_two_blocks):
    """A KeyboardInterrupt after two blocks of cell latents; the same run again skips level 1, writes only the
    five missing blocks and ends with the latents of an uninterrupted embedding."""
    from xscale.data.writeback import LatentWriter
    from xscale.tl.store_embed import embed_store_cells

    kw = dict(level1_preset="tiny", level2_preset="tiny", n_domains=3, level1_max_steps=5, level2_max_steps=3,
              batch_size=64, progress=False)
    with monkeypatch.context() as m:
        real_write = interrupt_after_two_blocks(m)
        with pytest.raises(KeyboardInterrupt):
            run_store(store, tmp_path / "run", **kw)
    assert "X_xscale_cell" not in ad.read_zarr(store).obsm
    resumed = []
    with monkeypatch.context() as m:
        m.setattr(LatentWriter, "write_chunk", lambda self, i, v: (resumed.append(i), real_write(self, i, v)))
        result = run_store(store, tmp_path / "run", **kw)
    assert result.skipped == ["level1"]
    cells_blocks = resumed[: CellStore(store).n_chunks - 2]
    assert sorted(cells_blocks) == list(range(2, CellStore(store).n_chunks))  # then the niches' blocks
    got = np.asarray(ad.read_zarr(store).obsm["X_xscale_cell"])
    fresh = prepare(xscale.datasets.path("starmap_mpfc"), tmp_path / "fresh.zarr", slide_key="slice",
                    chunk_cells=500, progress=False)
    embed_store_cells(fresh, result.level1, progress=False)
    np.testing.assert_array_equal(got, np.asarray(ad.read_zarr(fresh).obsm["X_xscale_cell"]))


def test_rerun_on_a_store_prepared_again_with_another_graph_refuses_the_old_level2(store, tmp_path):
    """Level 2 reads niches through the store's graph: prepared again with more neighbours (same cells, same order),
    the finished level 2 is not reused silently."""
    kw = dict(level1_preset="tiny", level2_preset="tiny", n_domains=3, level1_max_steps=3, level2_max_steps=2,
              batch_size=64, progress=False)
    run_store(store, tmp_path / "run", **kw)
    prepare(xscale.datasets.path("starmap_mpfc"), store, slide_key="slice", chunk_cells=500, n_neighbors=5,
            overwrite=True, progress=False)
    with pytest.raises(XscaleInputError, match=r"Stage 'level2' .* finished with other settings \(graph"):
        run_store(store, tmp_path / "run", **kw)
