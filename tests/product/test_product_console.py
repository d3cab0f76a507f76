"""What a training run prints: xscale's own progress, not third-party notes that say nothing to the user."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

# Each of these printed during `xscale demo` before it was silenced or its cause removed.
NOISE = [
    "💡 Tip",  # Lightning's advertisement for its cloud logger
    "isinstance(treespec, LeafSpec)",  # Lightning's pytree helper on torch 2.13
    "You have overridden `transfer_batch_to_device`",  # the hook xscale defines on purpose
    "Total length of `list` across ranks is zero",  # a validation loop over no data
    "smaller than the logging interval",  # log_every_n_steps longer than an epoch
    "Writing zarr v2 data will no longer be the default",  # anndata's notice (xscale pins format 2)
    "is not a valid key",  # docrep, at squidpy's import
    "zarr v3 autosharding will be the default",  # anndata's notice (xscale's stores pin no sharding)
]
# Printed by `xscale fit` (LightningCLI) before they were silenced or their cause removed.
FIT_NOISE = [
    "💡 Tip",  # the tip filter sat on a logger that importing lightning.pytorch.cli replaced
    "LightningCLI's args parameter",  # xscale fit hands LightningCLI its translated arguments
    "No seed found",  # no default seed
    "Unable to serialize instance",  # the checkpoint plugin given as an object, not a class path
]

SCRIPT = textwrap.dedent("""
    import logging, sys
    import numpy as np
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("lightning").propagate = False  # as the CLI does
    import xscale.datasets
    from xscale.train.staged import run_staged
    from xscale.train.finetune import finetune

    a = xscale.datasets.load("starmap_mpfc")
    a = a[np.sort(np.random.default_rng(0).choice(a.n_obs, 300, replace=False))].copy()
    res = run_staged(a.copy(), sys.argv[1], level1_preset="tiny", level2_preset="tiny", slide_key="slice",
                     train_slides=["20180417_BZ5_control", "20180419_BZ9_control"], n_domains=3,
                     level1_max_steps=3, level2_max_steps=3, batch_size=32, progress=False)
    finetune(res.level1, a, task="batch_correction", slide_key="slice", max_steps=2, batch_size=48, progress=False)
    from xscale.data.prepare import prepare
    prepare(a, sys.argv[1] + "_store.zarr", slide_key="slice", chunk_cells=64)
    print("DONE")
""")


def test_a_staged_run_a_finetune_and_prepare_print_no_third_party_noise(tmp_path):
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "run")], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0 and "DONE" in out.stdout, out.stderr[-3000:]
    printed = out.stdout + out.stderr
    assert [n for n in NOISE if n in printed] == [], printed[-4000:]
    # the panel report once per operation: level 1's training slides (not again for their validation
    # cells), then all cells for embedding and for the fine-tuning (not again for its internal samples)
    panel = [line for line in printed.splitlines() if "using 166 of 166 panel genes" in line]
    assert sum("(185 cells" in line for line in panel) == 1 and sum("(300 cells" in line for line in panel) == 2, panel
    assert any("Level 1 trained for 3 steps" in line for line in printed.splitlines()), printed[-3000:]


def test_quiet_fit_drops_only_the_listed_notes(caplog):
    import logging
    import warnings

    from xscale.train.quiet import RANK_ZERO_LOGGERS, log_interval, quiet_fit

    loggers = [logging.getLogger(name) for name in RANK_ZERO_LOGGERS]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_fit():
            warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", DeprecationWarning, stacklevel=1)
            warnings.warn("Your `IterableDataset` has `__len__` defined. In combination with ...", stacklevel=1)
            warnings.warn("something the user should see", UserWarning, stacklevel=1)
            for logger in loggers:  # whichever of them Lightning's rank_zero_info writes to
                with caplog.at_level(logging.INFO, logger=logger.name):
                    logger.info("💡 Tip: install our cloud product")
                    logger.info("GPU available: False")
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, outside", DeprecationWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something the user should see",
                                                "`isinstance(treespec, LeafSpec)` is deprecated, outside"]
    assert [r.getMessage() for r in caplog.records] == ["GPU available: False"] * len(loggers)
    assert not any(logger.filters for logger in loggers)  # removed after the fit
    assert (log_interval(33), log_interval(500), log_interval(0), log_interval(7, default=10)) == (33, 50, 1, 7)


def test_xscale_fit_prints_no_third_party_noise(tmp_path):
    """The real command line (sys.argv holds the arguments), LightningCLI imported inside the fit."""
    root = Path(__file__).resolve().parents[2] / "configs"
    run = "import sys; from xscale.cli.main import main; sys.exit(main(sys.argv[1:]))"
    args = ["fit", "--config", str(root / "model/level1/tiny.yaml"), "--config", str(root / "data/starmap_mpfc.yaml"),
            "--save-dir", str(tmp_path / "m"), "trainer.max_steps=2", "trainer.enable_progress_bar=false",
            f"trainer.default_root_dir={tmp_path}", "data.init_args.batch_size=16", "trainer.limit_val_batches=0"]
    out = subprocess.run([sys.executable, "-c", run, *args], capture_output=True, text=True, timeout=600,
                         cwd=tmp_path)
    printed = out.stdout + out.stderr
    assert out.returncode == 0, printed[-3000:]
    assert [n for n in FIT_NOISE if n in printed] == [], printed[-4000:]
    assert "Seed set to 0" in printed  # the default seed, said once
    saved = next(tmp_path.rglob("config.yaml")).read_text()  # the run's config records seed and plugin
    assert "seed_everything: 0" in saved and "xscale.train.checkpointing.SafeCheckpointIO" in saved


def test_loop_defaults_skip_an_empty_validation_loop():
    from xscale.train.quiet import loop_defaults

    class Data:
        def __init__(self, val):
            self.val = val

        def train_dataloader(self):
            return list(range(12))

        def val_dataloader(self):
            return self.val

    assert loop_defaults(Data([])) == {"log_every_n_steps": 12, "limit_val_batches": 0}
    assert loop_defaults(Data([1, 2]), default_interval=10) == {"log_every_n_steps": 10}
