"""Child process for kill/resume tests: ``python reliability_resume_child.py CKPT_DIR MAX_STEPS EVERY SLEEP``.

Prints one JSON line ``{"start_step": ..., "end_step": ...}`` when the fit returns.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from xscale.train.checkpointing import fit_resumable  # noqa: E402
from xscale.utils.seed import seed_everything  # noqa: E402

from reliability_tiny_module import TinyModule, tiny_loader  # noqa: E402

if __name__ == "__main__":
    ckpt_dir, max_steps, every, sleep = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    torch.set_num_threads(1)
    seed_everything(0)
    module = TinyModule(sleep=sleep)
    trainer = fit_resumable(
        module, train_dataloaders=tiny_loader(), ckpt_dir=ckpt_dir, every_n_train_steps=every,
        trainer_kwargs=dict(max_steps=max_steps, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, accelerator="cpu"),
    )
    print(json.dumps({"start_step": module.start_step, "end_step": trainer.global_step}), flush=True)
