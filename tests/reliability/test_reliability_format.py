"""Checkpoint format: v0 -> v1 upgrade, unknown versions, corrupted files, atomic saves."""
from __future__ import annotations

import json

import pytest
import torch

from xscale.errors import CheckpointError
from xscale.models import io as mio
from xscale.models.io import (
    FORMAT_VERSION,
    load_model,
    read_checkpoint_config,
    save_model,
    upgrade_checkpoint_config,
)

from conftest import TinyConfig, TinyLinear


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = TinyLinear(TinyConfig(n_in=4, n_out=3))
    return model, save_model(model, tmp_path / "m", extra={"note": "x"})


def test_save_load_roundtrip_identical(saved):
    model, path = saved
    again = load_model(path)
    x = torch.randn(5, 4)
    torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)
    assert again.config == model.config
    assert read_checkpoint_config(path)["extra"] == {"note": "x"}


def test_upgrade_v0_document():
    v0 = {"model_name": "reliability_tiny_linear", "config": {"n_in": 4, "n_out": 3}}
    v1 = upgrade_checkpoint_config(v0)
    assert v1 == {"format_version": FORMAT_VERSION, "model": "reliability_tiny_linear",
                  "config": {"n_in": 4, "n_out": 3}, "extra": {}}
    assert "format_version" not in v0  # the input is not mutated


def test_load_v0_directory_gives_same_outputs(saved):
    model, path = saved
    (path / "config.json").write_text(json.dumps(
        {"model_name": "reliability_tiny_linear", "config": {"n_in": 4, "n_out": 3}}
    ))
    again = load_model(path)
    x = torch.randn(2, 4)
    torch.testing.assert_close(again(x), model(x))


def test_upgrade_goes_through_registered_step(monkeypatch):
    calls = []

    def step(doc):
        calls.append(doc["format_version"])
        return mio._upgrade_v0_to_v1(doc)

    monkeypatch.setitem(mio._UPGRADES, 0, step)
    upgrade_checkpoint_config({"model_name": "m", "config": {}})
    assert calls == [0]


def test_v0_missing_keys_is_clear():
    with pytest.raises(CheckpointError, match="format v0 needs keys 'model_name' and 'config'"):
        upgrade_checkpoint_config({"format_version": 0, "model": "m"})


def test_newer_version_is_clear(saved):
    _, path = saved
    doc = json.loads((path / "config.json").read_text())
    doc["format_version"] = FORMAT_VERSION + 1
    (path / "config.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match=rf"format_version {FORMAT_VERSION + 1} is newer .* upgrade xscale"):
        load_model(path)


@pytest.mark.parametrize("version", [None, "1", -1, 1.0, True])
def test_invalid_version_is_clear(version):
    with pytest.raises(CheckpointError, match="no valid 'format_version'"):
        upgrade_checkpoint_config({"format_version": version, "model": "m", "config": {}})


def test_truncated_safetensors_is_clear(saved):
    _, path = saved
    w = path / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-7])
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        load_model(path)


def test_garbage_safetensors_header_is_clear(saved):
    _, path = saved
    (path / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(path)


def test_missing_weights_is_clear(saved):
    _, path = saved
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing; the model directory is incomplete"):
        load_model(path)


def test_corrupted_config_json_is_clear(saved):
    _, path = saved
    (path / "config.json").write_text('{"format_version": 1, "mod')
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model(path)


def test_unknown_config_key_is_clear(saved):
    _, path = saved
    doc = json.loads((path / "config.json").read_text())
    doc["config"]["n_hidden"] = 7
    (path / "config.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match=r"unknown keys \['n_hidden'\]"):
        load_model(path)


def test_unknown_model_name_is_clear(saved):
    _, path = saved
    doc = json.loads((path / "config.json").read_text())
    doc["model"] = "no_such_model"
    (path / "config.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="'no_such_model'; known models"):
        load_model(path)


def test_shape_mismatch_is_clear(saved):
    _, path = saved
    doc = json.loads((path / "config.json").read_text())
    doc["config"]["n_out"] = 5
    (path / "config.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="do not fit model"):
        load_model(path)


def test_missing_directory_is_clear(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nowhere")


def test_interrupted_save_keeps_previous_model(saved, monkeypatch):
    model, path = saved
    before = (path / "model.safetensors").read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_model(model, path)
    assert (path / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["m"]  # no temporary left behind


def test_non_json_extra_fails_before_writing(tmp_path):
    with pytest.raises(TypeError):
        save_model(TinyLinear(TinyConfig()), tmp_path / "m", extra={"bad": object()})
    assert not (tmp_path / "m").exists()
