"""No lost work: periodic atomic checkpoints; a SIGKILLed fit resumes from its last checkpoint."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from xscale.errors import CheckpointError
from xscale.train.checkpointing import (
    checkpoint_state_dict,
    fit_resumable,
    last_checkpoint,
    load_lightning_checkpoint,
)

from reliability_tiny_module import TinyModule, tiny_loader

HERE = Path(__file__).parent
KW = dict(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")


def test_resume_continues_global_step_and_matches_uninterrupted(tmp_path):
    torch.manual_seed(0)
    straight = TinyModule()
    fit_resumable(straight, train_dataloaders=tiny_loader(), ckpt_dir=tmp_path / "a",
                  trainer_kwargs=dict(max_steps=16, **KW), every_n_train_steps=4)

    torch.manual_seed(0)
    first = TinyModule()
    t1 = fit_resumable(first, train_dataloaders=tiny_loader(), ckpt_dir=tmp_path / "b",
                       trainer_kwargs=dict(max_steps=8, **KW), every_n_train_steps=4)
    assert t1.global_step == 8
    torch.manual_seed(1)  # a different init: the weights must come from the checkpoint
    second = TinyModule()
    t2 = fit_resumable(second, train_dataloaders=tiny_loader(), ckpt_dir=tmp_path / "b",
                       trainer_kwargs=dict(max_steps=16, **KW), every_n_train_steps=4)
    assert second.start_step == 8 and t2.global_step == 16
    # 8 steps = one full epoch of 8 batches, so the resumed run sees the same data order:
    for (k, a), (_, b) in zip(straight.state_dict().items(), second.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, msg=k)


def test_checkpoint_is_plain_data_and_rerun_of_finished_fit_is_a_noop(tmp_path):
    module = TinyModule()
    fit_resumable(module, train_dataloaders=tiny_loader(), ckpt_dir=tmp_path,
                  trainer_kwargs=dict(max_steps=5, **KW), every_n_train_steps=2)
    last = last_checkpoint(tmp_path)
    assert last == tmp_path / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)  # dataclass hparams were converted to plain data
    assert ckpt["global_step"] == 5  # final state saved at train end, not just at step 4
    assert ckpt["hyper_parameters"]["cfg"] == {"width": 8, "name": "tiny"}
    assert set(checkpoint_state_dict(last, prefix="net.")) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    again = TinyModule()
    t = fit_resumable(again, train_dataloaders=tiny_loader(), ckpt_dir=tmp_path,
                      trainer_kwargs=dict(max_steps=5, **KW), every_n_train_steps=2)
    assert again.start_step is None and t.global_step == 5  # restored, then no training step ran
    torch.testing.assert_close(again.state_dict(), module.state_dict())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temporaries


def test_different_model_in_ckpt_dir_is_clear(tmp_path):
    fit_resumable(TinyModule(width=8), train_dataloaders=tiny_loader(), ckpt_dir=tmp_path,
                  trainer_kwargs=dict(max_steps=2, **KW), every_n_train_steps=1)
    with pytest.raises(CheckpointError, match="different model.*shape mismatch.*new checkpoint directory"):
        fit_resumable(TinyModule(width=16), train_dataloaders=tiny_loader(), ckpt_dir=tmp_path,
                      trainer_kwargs=dict(max_steps=4, **KW), every_n_train_steps=1)


def test_truncated_last_ckpt_is_clear(tmp_path):
    fit_resumable(TinyModule(), train_dataloaders=tiny_loader(), ckpt_dir=tmp_path,
                  trainer_kwargs=dict(max_steps=2, **KW), every_n_train_steps=1)
    last = tmp_path / "last.ckpt"
    last.write_bytes(last.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated, corrupted or not a PyTorch checkpoint"):
        fit_resumable(TinyModule(), train_dataloaders=tiny_loader(), ckpt_dir=tmp_path,
                      trainer_kwargs=dict(max_steps=4, **KW))


def test_not_a_lightning_checkpoint_is_clear(tmp_path):
    torch.save({"w": torch.zeros(1)}, tmp_path / "x.ckpt")
    with pytest.raises(CheckpointError, match="not a Lightning training checkpoint.*found \\['w'\\]"):
        load_lightning_checkpoint(tmp_path / "x.ckpt")


def test_foreign_checkpoint_io_refused(tmp_path):
    from lightning.pytorch.plugins import TorchCheckpointIO

    with pytest.raises(ValueError, match="installs its own SafeCheckpointIO"):
        fit_resumable(TinyModule(), train_dataloaders=tiny_loader(), ckpt_dir=tmp_path,
                      trainer_kwargs=dict(max_steps=2, plugins=[TorchCheckpointIO()], **KW))


def _wait_for_step(last: Path, min_step: int, proc: subprocess.Popen, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"child ended early: {proc.communicate()}"
        if last.exists():
            step = load_lightning_checkpoint(last)["global_step"]
            if step >= min_step:
                return step
        time.sleep(0.2)
    raise AssertionError(f"no checkpoint at step >= {min_step} within {timeout}s")


@pytest.mark.slow
def test_sigkill_tiny_module_then_rerun_resumes(tmp_path):
    """Mechanics only (tiny module): SIGKILLed mid-fit; the same command resumes and completes."""
    ckpt = tmp_path / "ck"
    cmd = [sys.executable, str(HERE / "reliability_resume_child.py"), str(ckpt), "60", "5", "0.05"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        _wait_for_step(ckpt / "last.ckpt", 10, proc, timeout=90)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    saved = load_lightning_checkpoint(ckpt / "last.ckpt")["global_step"]  # still a complete file
    assert 10 <= saved < 60

    rerun = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    result = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert result == {"start_step": saved, "end_step": 60}
    assert load_lightning_checkpoint(ckpt / "last.ckpt")["global_step"] == 60
    assert sorted(p.name for p in ckpt.iterdir()) == ["last.ckpt"]


@pytest.mark.slow  # the default suite kills a real `xscale run` in level 1 instead (test_reliability_cli_resume)
def test_sigkill_level1_fit_then_rerun_resumes(tmp_path):
    """Level 1 (GeneToCell on real cells, fit_level1) SIGKILLed mid-training; the same command resumes."""
    out = tmp_path / "run"
    cmd = [sys.executable, str(HERE / "reliability_level1_child.py"), str(out), "40", "5", "0.08"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    last = out / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        _wait_for_step(last, 5, proc, timeout=120)
    finally:
        proc.send_signal(signal.SIGKILL)
        first_out, _ = proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert "START 0" in first_out and "END" not in first_out
    saved = load_lightning_checkpoint(last)["global_step"]
    assert 5 <= saved < 40
    assert not (out / "model").exists()  # the final model is only written by a finished fit

    rerun = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"START {saved}" in rerun.stdout and "END 40" in rerun.stdout, rerun.stdout
    assert load_lightning_checkpoint(last)["global_step"] == 40

    from xscale.models.io import load_model

    model = load_model(out / "model")
    state = checkpoint_state_dict(last, prefix="model.")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k], msg=k)  # saved model == final checkpoint


def test_user_model_checkpoint_is_kept_and_also_safe(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    best = ModelCheckpoint(dirpath=tmp_path / "best", every_n_train_steps=2, save_top_k=1)
    fit_resumable(TinyModule(), train_dataloaders=tiny_loader(), ckpt_dir=tmp_path / "ck",
                  trainer_kwargs=dict(max_steps=4, callbacks=[best], **KW), every_n_train_steps=2)
    files = list((tmp_path / "best").glob("*.ckpt"))
    assert len(files) == 1
    torch.load(files[0], weights_only=True)  # written through SafeCheckpointIO too
    assert load_lightning_checkpoint(tmp_path / "ck" / "last.ckpt")["global_step"] == 4


def test_failed_checkpoint_write_keeps_previous_last_ckpt(tmp_path, monkeypatch):
    from xscale.train.checkpointing import SafeCheckpointIO

    io_ = SafeCheckpointIO()
    last = tmp_path / "last.ckpt"
    io_.save_checkpoint({"state_dict": {"w": torch.ones(2)}, "global_step": 1, "epoch": 0}, last)

    def crash(*args, **kwargs):
        raise OSError("killed mid-write")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="killed mid-write"):
        io_.save_checkpoint({"state_dict": {"w": torch.zeros(2)}, "global_step": 2, "epoch": 0}, last)
    monkeypatch.undo()
    assert io_.load_checkpoint(last)["global_step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # the temporary was removed


@pytest.mark.parametrize("with_val", [False, True])
@pytest.mark.parametrize("max_steps", [-1, 100])
@pytest.mark.parametrize("crash_at", [3])
def test_epoch_budget_survives_a_crash(tmp_path, with_val, max_steps, crash_at):
    """A crash after an epoch-end checkpoint must not lose or repeat an epoch (2 batches/epoch, 5 epochs)."""
    from lightning.pytorch.callbacks import Callback

    class Crash(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == crash_at:
                raise RuntimeError("crash")  # no on_train_end, like a kill

    class WithVal(TinyModule):
        def validation_step(self, batch, batch_idx):
            self.log("val", torch.nn.functional.mse_loss(self.net(batch[0]), batch[1]))

    def fit(callbacks):
        module = WithVal()
        return fit_resumable(
            module, train_dataloaders=tiny_loader(n=16), val_dataloaders=tiny_loader(n=8) if with_val else None,
            ckpt_dir=tmp_path, every_n_train_steps=100,
            trainer_kwargs=dict(max_epochs=5, max_steps=max_steps, callbacks=callbacks, num_sanity_val_steps=0, **KW))

    with pytest.raises(RuntimeError, match="crash"):
        fit([Crash()])
    assert load_lightning_checkpoint(tmp_path / "last.ckpt")["global_step"] == 2 * (crash_at // 2)
    t = fit([])
    assert t.global_step == 10 and t.current_epoch == 5
