"""No file makes xscale run code: planted pickles are refused, with a reason, before unpickling."""
from __future__ import annotations

import json
import pickle

import pytest
import torch

from xscale.errors import CheckpointError
from xscale.models.io import load_model
from xscale.train.checkpointing import SafeCheckpointIO, load_lightning_checkpoint

KINDS = ["torch", "torch-legacy", "pickle"]


@pytest.mark.parametrize("kind", KINDS)
def test_planted_payload_is_live(tmp_path, plant, marker, kind):
    """Control: the planted file really runs code when unpickled unsafely."""
    path = plant(tmp_path / "evil.ckpt", kind)
    if kind == "pickle":
        pickle.loads(path.read_bytes())
    else:
        torch.load(path, weights_only=False)
    assert marker.read_text() == "pwned"


@pytest.mark.parametrize("kind", KINDS)
def test_lightning_loader_refuses_pickle(tmp_path, plant, marker, kind):
    path = plant(tmp_path / "evil.ckpt", kind)
    with pytest.raises(CheckpointError, match=r"weights_only=True") as info:
        load_lightning_checkpoint(path)
    assert "run arbitrary code" in str(info.value)
    assert not marker.exists()


def test_checkpoint_io_ignores_weights_only_false(tmp_path, plant, marker):
    path = plant(tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="Refusing to load"):
        SafeCheckpointIO().load_checkpoint(path, weights_only=False)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["model.ckpt", "model.pt"])
def test_load_model_refuses_pickle_file(tmp_path, plant, marker, name):
    path = plant(tmp_path / name)
    with pytest.raises(CheckpointError, match="unpickling can run code"):
        load_model(path)
    assert not marker.exists()


def test_load_model_refuses_pickle_named_safetensors(tmp_path, plant, marker):
    d = tmp_path / "model"
    plant(d / "model.safetensors", "torch")
    (d / "config.json").write_text(json.dumps(
        {"format_version": 1, "model": "reliability_tiny_linear", "config": {"n_in": 4, "n_out": 2}, "extra": {}}
    ))
    with pytest.raises(CheckpointError, match="not a valid safetensors file") as info:
        load_model(d)
    assert "never unpickles" in str(info.value)
    assert not marker.exists()


def test_load_model_ignores_pickle_inside_dir(tmp_path, plant, marker):
    d = tmp_path / "model"
    plant(d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="No config.json") as info:
        load_model(d)
    assert "pytorch_model.bin" in str(info.value)  # says what it found
    assert not marker.exists()


def test_fit_resumable_refuses_planted_last_ckpt(tmp_path, plant, marker):
    from xscale.train.checkpointing import fit_resumable

    from reliability_tiny_module import TinyModule, tiny_loader

    plant(tmp_path / "ck" / "last.ckpt")
    with pytest.raises(CheckpointError, match="Refusing to load"):
        fit_resumable(TinyModule(), train_dataloaders=tiny_loader(), ckpt_dir=tmp_path / "ck",
                      trainer_kwargs=dict(max_steps=2, logger=False, enable_progress_bar=False,
                                          enable_model_summary=False, accelerator="cpu"))
    assert not marker.exists()


# ---------------------------------------------------------------- through the CLI: xscale embed --checkpoint
def _embed(checkpoint, out, capsys) -> tuple[int, str]:
    from xscale.cli.main import main

    rc = main(["embed", "--checkpoint", str(checkpoint), "--data", "starmap_mpfc", "--out", str(out)])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["level1.ckpt", "model.pt"])
def test_cli_embed_refuses_planted_checkpoint_file(tmp_path, plant, marker, capsys, kind, name):
    path = plant(tmp_path / name, kind)
    rc, err = _embed(path, tmp_path / "out", capsys)
    assert rc == 2
    assert "Traceback" not in err
    assert "Refusing to load" in err and "weights_only=True" in err and "run arbitrary code" in err
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_cli_embed_refuses_pickle_named_safetensors(tmp_path, plant, marker, capsys):
    from xscale.models.gene_to_cell import GeneToCell, GeneToCellConfig
    from xscale.models.io import save_model

    d = save_model(GeneToCell(GeneToCellConfig.preset("tiny", genes=["A", "B", "C"])), tmp_path / "model")
    plant(d / "model.safetensors", "torch")
    rc, err = _embed(d, tmp_path / "out", capsys)
    assert rc == 2 and "not a valid safetensors file" in err and "never unpickles" in err
    assert not marker.exists()


def test_cli_embed_ignores_pickles_in_a_directory(tmp_path, plant, marker, capsys):
    d = tmp_path / "ckpts"
    plant(d / "level1" / "model.pt")
    plant(d / "last.ckpt")
    rc, err = _embed(d, tmp_path / "out", capsys)
    assert rc == 2 and "expected a model directory" in err
    assert not marker.exists()


# ---------------------------------------------------------------- xscale fit --ckpt-path
def test_cli_fit_resume_from_planted_checkpoint_runs_nothing(tmp_path, plant, marker, capsys, monkeypatch):
    """``xscale fit --ckpt-path`` reads through SafeCheckpointIO: the payload never runs; exit 2 says why."""
    from pathlib import Path

    from xscale.cli.main import main

    root = Path(__file__).resolve().parents[2] / "configs"
    evil = plant(tmp_path / "last.ckpt")
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(root / "model/level1/tiny.yaml"), "--config", str(root / "data/starmap_mpfc.yaml"),
            "--save-dir", str(tmp_path / "m"), "--ckpt-path", str(evil), "trainer.max_steps=2", "trainer.logger=false",
            "trainer.enable_progress_bar=false", "data.init_args.batch_size=16", "trainer.limit_val_batches=0"]
    rc = main(args)
    err_text = capsys.readouterr().err
    assert not marker.exists()
    assert not (tmp_path / "m").exists()
    assert rc == 2 and "Traceback" not in err_text
    assert "Refusing to load" in err_text
