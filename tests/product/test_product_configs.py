"""Every YAML under configs/ instantiates; `xscale fit` trains from them at tiny settings."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
TINY_DATA = ROOT / "configs" / "data" / "starmap_mpfc.yaml"
TINY_L1 = ROOT / "configs" / "model" / "level1" / "tiny.yaml"


@pytest.fixture(scope="module")
def level1_dir(tmp_path_factory):
    """A (randomly initialised) tiny level-1 model saved like a real one."""
    import xscale
    from xscale.models.gene_to_cell import GeneToCell, GeneToCellConfig
    from xscale.models.io import save_model

    genes = list(xscale.datasets.load("starmap_mpfc").var_names)
    path = tmp_path_factory.mktemp("l1") / "level1"
    save_model(GeneToCell(GeneToCellConfig.preset("tiny", genes=genes)), path)
    return path


def _niche_data(tmp: Path, level1: Path, dataset: Path) -> Path:
    p = tmp / "niche_data.yaml"
    p.write_text(yaml.safe_dump({"data": {"class_path": "xscale.cli.fit.NicheData",
                                          "init_args": {"dataset": str(dataset), "level1": str(level1)}}}))
    return p


def test_configs_exist_for_every_level_dataset_and_experiment():
    import xscale.datasets as ds

    names = {str(p.relative_to(ROOT / "configs")) for p in CONFIGS}
    for level in ("level1", "level2"):
        assert {f"model/{level}/{p}.yaml" for p in ("tiny", "small", "base")} <= names
    assert {f"data/{d}.yaml" for d in ds.available()} <= names
    assert {f"experiment/{e}.yaml" for e in ("staged", "joint", "multi_dataset", "finetune")} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(ROOT / "configs")) for p in CONFIGS])
def test_every_config_instantiates(path, level1_dir, starmap_subset_h5ad, tmp_path, monkeypatch):
    import lightning

    from xscale.cli.fit import build_cli
    from xscale.pipelines import load_experiment

    monkeypatch.chdir(tmp_path)  # default_root_dir etc. land in tmp
    doc = yaml.safe_load(path.read_text())
    assert isinstance(doc, dict) and doc, f"{path} is empty"
    if "uses" in doc:  # a pipeline-step experiment: parameters checked against the step's signature
        kind, params = load_experiment(path)
        assert kind == doc["uses"] and params == (doc.get("with") or {})
        return
    assert set(doc) <= {"model", "data", "trainer", "seed_everything", "ckpt_path", "optimizer", "lr_scheduler"}
    args = []
    if "model" not in doc:
        args += ["--config", str(TINY_L1)]
    args += ["--config", str(path)]
    is_level2 = "model" in doc and doc["model"]["class_path"].endswith("Level2")
    if "data" not in doc:
        args += ["--config", str(_niche_data(tmp_path, level1_dir, starmap_subset_h5ad) if is_level2 else TINY_DATA)]
    elif doc["data"]["class_path"].endswith("NicheData"):  # real STARmap cells, fewer of them: faster
        args += [f"--data.init_args.level1={level1_dir}", f"--data.init_args.dataset={starmap_subset_h5ad}"]
    needs_gpu = str((doc.get("trainer") or {}).get("accelerator")) in ("gpu", "cuda")
    if needs_gpu and not _has_cuda():
        # Parsed and type-checked as written; instantiated on the CPU (one device) where there is no GPU.
        args += ["--trainer.accelerator=cpu", "--trainer.devices=1"]
        strategy = doc["trainer"].get("strategy")
        if isinstance(strategy, dict):  # GPU-only strategies (FSDP): instantiate the strategy object itself
            import importlib

            module, _, name = strategy["class_path"].rpartition(".")
            obj = getattr(importlib.import_module(module), name)(**strategy.get("init_args", {}))
            assert type(obj).__name__ == name
            args += ["--trainer.strategy=auto"]
    cli = build_cli(args)
    assert isinstance(cli.model, lightning.LightningModule)
    assert isinstance(cli.datamodule, lightning.LightningDataModule)
    assert isinstance(cli.trainer, lightning.Trainer)
    if "model" in doc and "preset" in doc["model"].get("init_args", {}):
        from xscale.models.cell_to_tissue import CellToTissueConfig
        from xscale.models.gene_to_cell import GeneToCellConfig

        preset = doc["model"]["init_args"]["preset"]
        cfg_cls = CellToTissueConfig if is_level2 else GeneToCellConfig
        assert cli.model.model.config.dim == (cfg_cls.PRESETS if is_level2 else _l1_presets())[preset]["dim"]


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _l1_presets():
    from xscale.models import gene_to_cell

    return gene_to_cell._PRESETS


def test_xscale_fit_trains_and_saves_a_model(tmp_path, monkeypatch, capsys):
    from xscale.cli.main import main
    from xscale.models.io import load_model

    monkeypatch.chdir(tmp_path)
    code = main(["fit", "--config", str(TINY_L1), "--config", str(TINY_DATA), "--save-dir", str(tmp_path / "m"),
                 "trainer.max_steps=2", "trainer.logger=false", "trainer.enable_checkpointing=false",
                 "trainer.enable_progress_bar=false", "data.init_args.batch_size=16", "trainer.limit_val_batches=0"])
    assert code == 0
    model = load_model(tmp_path / "m")
    assert type(model).__name__ == "GeneToCell" and model.config.dim == _l1_presets()["tiny"]["dim"]
    assert main(["fit", "--config", str(TINY_L1), "nonsense"]) == 2
    capsys.readouterr()
    assert main(["fit", "--config", str(TINY_L1), "--config", str(TINY_DATA), "trainer.max_stepz=2"]) == 2
    err = capsys.readouterr().err
    assert "xscale fit --help" in err and "max_stepz" in err and "--print-config" in err


def test_xscale_fit_data_configs_train_with_the_models_gene_context(tmp_path, monkeypatch):
    """The shipped data configs say max_genes: model: each cell's context is the level-1 model's
    max_genes, as in xscale run (they fixed 256 while the small preset trains with 192)."""
    from xscale.cli.fit import build_cli

    monkeypatch.chdir(tmp_path)
    assert yaml.safe_load(TINY_DATA.read_text())["data"]["init_args"]["max_genes"] == "model"
    cli = build_cli(["--config", str(TINY_L1), "--config", str(TINY_DATA),
                     "--model.init_args.overrides={max_genes: 40}", "--trainer.max_steps=1", "--trainer.logger=false",
                     "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
                     "--trainer.limit_val_batches=0", "--data.init_args.batch_size=8"])
    assert cli.model.model.config.max_genes == 40
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.datamodule.max_genes == 40
    batch = next(iter(cli.datamodule.train_dataloader()))
    assert batch.gene_ids.shape[1] == 40  # STARmap's 166 genes, 40 of them per cell
    cli = build_cli(["--config", str(TINY_L1), "--config", str(TINY_DATA), "--data.init_args.max_genes=24",
                     "--trainer.logger=false"])
    assert cli.datamodule.max_genes == 24 and not cli.datamodule.max_genes_from_model


def test_xscale_fit_own_data_with_counts_layer_and_clear_errors(tmp_path, monkeypatch, capsys):
    """Your own .h5ad with log-normalised X and raw counts in a layer trains (counts_layer was applied
    twice: "not found in adata.layers. Available: []"); a bad dataset path is one line, exit 2 (was
    two tracebacks from jsonargparse, exit 1)."""
    import scipy.sparse as sp

    import xscale
    from xscale.cli.main import main

    monkeypatch.chdir(tmp_path)
    a = xscale.datasets.load("starmap_mpfc")[:300].copy()
    a.layers["counts"] = a.X.copy()
    x = a.X.toarray()
    a.X = sp.csr_matrix(np.log1p(x / x.sum(1, keepdims=True) * 1e4))
    a.write_h5ad(tmp_path / "mine.h5ad")
    common = ["fit", "--config", str(TINY_L1), "--config", str(TINY_DATA), "--save-dir", str(tmp_path / "m"),
              "trainer.max_steps=2", "trainer.logger=false", "trainer.enable_checkpointing=false",
              "trainer.enable_progress_bar=false", "trainer.limit_val_batches=0", "data.init_args.batch_size=16"]
    mine = f"data.init_args.datasets=[{tmp_path / 'mine.h5ad'}]"
    assert main([*common, mine, "data.init_args.counts_layer=counts"]) == 0
    assert (tmp_path / "m" / "model.safetensors").is_file()
    capsys.readouterr()
    assert main([*common, f"data.init_args.datasets=[{tmp_path / 'missing.h5ad'}]"]) == 2
    err = capsys.readouterr().err
    assert "missing.h5ad: expected a bundled dataset name (starmap_mpfc, " in err
    assert "found nothing at this path" in err
    assert "jsonargparse" not in err and "Union subtypes" not in err  # (a stale log handler may print its own)


def test_xscale_fit_resumes_from_last(tmp_path, monkeypatch, capsys):
    """--ckpt-path last resumes from the newest checkpoint of the run (Lightning's own 'last'
    finds none with default checkpointing and silently starts again); none is a clear error."""
    import torch

    from xscale.cli.main import main

    monkeypatch.chdir(tmp_path)
    common = ["--config", str(TINY_L1), "--config", str(TINY_DATA), f"trainer.default_root_dir={tmp_path / 'run'}",
              "trainer.enable_progress_bar=false", "data.init_args.batch_size=16", "trainer.limit_val_batches=0"]
    assert main(["fit", "--ckpt-path", "last", *common, "trainer.max_steps=2"]) == 2
    assert "--ckpt-path last: expected a Lightning checkpoint (*.ckpt) under" in capsys.readouterr().err
    assert main(["fit", *common, "trainer.max_steps=2"]) == 0
    first = sorted((tmp_path / "run").rglob("*.ckpt"))
    assert len(first) == 1 and "step=2" in first[0].name
    assert main(["fit", "--ckpt-path", "last", *common, "trainer.max_steps=4"]) == 0
    newest = max((tmp_path / "run").rglob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    assert "step=4" in newest.name
    assert torch.load(newest, weights_only=True)["global_step"] == 4  # 2 resumed + 2 new, not 4 from scratch
    capsys.readouterr()  # a checkpoint of another model (other shapes): one line, before any training
    other = ["model.init_args.preset=small", "trainer.max_steps=6"]
    assert main(["fit", "--ckpt-path", str(newest), *common, *other]) == 2
    assert "expected a checkpoint of this model, found one of another" in capsys.readouterr().err


@pytest.mark.slow
def test_xscale_fit_level2_and_joint(level1_dir, starmap_subset_h5ad, tmp_path, monkeypatch):
    from xscale.cli.main import main
    from xscale.models.io import load_model

    monkeypatch.chdir(tmp_path)
    quick = ["trainer.max_steps=2", "trainer.logger=false", "trainer.enable_checkpointing=false",
             "trainer.enable_progress_bar=false"]
    exp = ROOT / "configs" / "experiment"
    assert main(["fit", "--save-dir", str(tmp_path / "l2"), "--config", str(exp / "level2.yaml"),
                 "--config", str(ROOT / "configs/model/level2/tiny.yaml"),
                 f"data.init_args.level1={level1_dir}", f"data.init_args.dataset={starmap_subset_h5ad}", *quick]) == 0
    assert type(load_model(tmp_path / "l2")).__name__ == "CellToTissue"
    assert main(["fit", "--save-dir", str(tmp_path / "j"), "--config", str(exp / "joint.yaml"),
                 "model.init_args.level1_preset=tiny", "model.init_args.level2_preset=tiny", *quick]) == 0
    assert (tmp_path / "j" / "level1" / "config.json").is_file()
    assert (tmp_path / "j" / "level2" / "config.json").is_file()
