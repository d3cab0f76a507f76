"""The optimiser and schedule shared by the level-2 and joint training modules, and the weight
average that fine-tuning can use."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from torch import nn

from xscale.errors import XscaleInputError


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


class EMAWeights(EMAWeightAveraging):
    """Exponential moving average of the trained weights (Lightning's EMA callback), swapped in
    at the end of training; :meth:`applied` lends the average to a scoring step mid-training.

    Only parameters are averaged (``use_buffers=False``): integer buffers (labels, counters)
    would be rounded by averaging, and normalisation statistics are re-measured after training.
    After ``fit`` the module holds the averaged parameters.
    """

    def __init__(self, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise XscaleInputError(f"ema_decay: expected a value in (0, 1) such as 0.98, found {decay}.")
        super().__init__(decay=decay, use_buffers=False)
        self.decay = decay

    @contextmanager
    def applied(self, module: nn.Module) -> Iterator[None]:
        """Within the block, ``module`` holds the averaged parameters; its own come back after."""
        if self._average_model is None:  # before the first step: nothing averaged yet
            yield
            return
        self._swap_models(module)
        try:
            yield
        finally:
            self._swap_models(module)
