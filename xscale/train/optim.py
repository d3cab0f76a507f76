"""The optimiser and schedule shared by the level-2 and joint training modules."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


def adamw_one_cycle(module: nn.Module, trainer: Any, *, lr: float, weight_decay: float) -> dict[str, Any]:
    """AdamW + a per-step one-cycle cosine schedule over the trainer's estimated steps.

    OneCycleLR divides by zero below ~10 steps, so the cycle spans at least 20 steps:
    a shorter run simply stops early in it.
    """
    opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=weight_decay)
    total = trainer.estimated_stepping_batches if trainer is not None else 1000
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=max(int(total), 20), pct_start=0.1, anneal_strategy="cos"
    )
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
