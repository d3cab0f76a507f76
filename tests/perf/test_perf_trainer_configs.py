"""Every configs/trainer/*.yaml names only real Trainer arguments; the CPU ones build a Trainer."""
from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import yaml

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "trainer"
NAMES = ["cpu", "gpu", "ddp", "fsdp", "multinode"]


def _trainer_kwargs(name: str) -> dict:
    doc = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    assert set(doc) == {"trainer"}, doc.keys()
    return doc["trainer"]


@pytest.mark.parametrize("name", NAMES)
def test_trainer_config_keys_are_trainer_arguments(name):
    import lightning

    kwargs = _trainer_kwargs(name)
    params = inspect.signature(lightning.Trainer.__init__).parameters
    unknown = sorted(set(kwargs) - set(params))
    assert not unknown, f"{name}.yaml: not lightning.Trainer arguments: {unknown}"
    strategy = kwargs.get("strategy")
    if isinstance(strategy, dict):  # class_path + init_args, as LightningCLI reads it
        module, _, cls_name = strategy["class_path"].rpartition(".")
        cls = getattr(__import__(module, fromlist=[cls_name]), cls_name)
        bad = sorted(set(strategy.get("init_args", {})) - set(inspect.signature(cls.__init__).parameters))
        assert not bad, f"{name}.yaml: {cls_name} has no arguments {bad}"
        cls(**strategy.get("init_args", {}))


@pytest.mark.parametrize("name,overrides", [("cpu", {}), ("ddp", {"accelerator": "cpu", "devices": 2,
                                                                   "precision": "32-true"})])
def test_cpu_trainer_configs_instantiate(name, overrides, tmp_path):
    import lightning

    kwargs = {**_trainer_kwargs(name), **overrides, "default_root_dir": str(tmp_path), "logger": False}
    trainer = lightning.Trainer(**kwargs)
    assert trainer.num_devices == kwargs["devices"]
    if name == "ddp":
        assert type(trainer.strategy).__name__ == "DDPStrategy"
