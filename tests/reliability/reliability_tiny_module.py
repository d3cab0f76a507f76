"""A tiny LightningModule for checkpoint mechanics (no real data needed: mechanics only)."""
from __future__ import annotations

import dataclasses
import time

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset


@dataclasses.dataclass
class TinyHParams:
    width: int = 8
    name: str = "tiny"


class TinyModule(L.LightningModule):
    """Linear regression; ``sleep`` seconds per step make mid-training kills easy to time."""

    def __init__(self, cfg: TinyHParams | None = None, sleep: float = 0.0, width: int = 8) -> None:
        super().__init__()
        # A dataclass in the hyperparameters: must still load with weights_only=True.
        self.save_hyperparameters({"cfg": cfg or TinyHParams(width=width), "sleep": sleep})
        self.net = torch.nn.Sequential(torch.nn.Linear(4, width), torch.nn.Tanh(), torch.nn.Linear(width, 1))
        self.sleep = sleep
        self.start_step: int | None = None

    def on_train_start(self) -> None:
        self.start_step = self.trainer.global_step

    def training_step(self, batch, batch_idx):
        if self.sleep:
            time.sleep(self.sleep)
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=1e-2)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=5)}


def tiny_loader(n: int = 64, batch_size: int = 8, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = x.sum(1, keepdim=True)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)
