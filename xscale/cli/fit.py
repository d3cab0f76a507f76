"""``xscale fit``: train one level from YAML configs with Lightning's ``LightningCLI``.

The classes named in ``configs/`` (``xscale.cli.fit.Level1``, ``Level2``, ``Joint``,
``CellData``, ``NicheData``, ``JointData``) are thin, YAML-friendly adapters over the library's LightningModules and
DataModules (:mod:`xscale.train.level1`, :mod:`xscale.train.level2`,
:mod:`xscale.train.joint`). They are defined on
first access (PEP 562 module ``__getattr__``) so that importing this module for
``xscale --help`` does not import Lightning.
"""
from __future__ import annotations

import argparse
import os
import warnings
from typing import Any

HELP = "train one level (or more) from YAML configs with LightningCLI"
DESCRIPTION = """\
Train with Lightning's LightningCLI from configs (later files override earlier ones;
dotted KEY=VALUE overrides go last, after every option):

  xscale fit --config configs/experiment/multi_dataset.yaml
  xscale fit --config configs/trainer/cpu.yaml --config configs/model/level1/tiny.yaml \\
             --config configs/data/starmap_mpfc.yaml trainer.max_epochs=1

model: xscale.cli.fit.Level1 (genes -> cells), xscale.cli.fit.Level2 (cells -> niches) or
       xscale.cli.fit.Joint (both levels, summed losses; may start from staged models);
data:  xscale.cli.fit.CellData (bundled names or .h5ad/.zarr paths; held-out slides left out),
       xscale.cli.fit.NicheData (cells embedded by a trained level-1 model) or
       xscale.cli.fit.JointData (niches whose cells are read as counts).
The genes (level 1) and latent size (level 2) come from the data. The trained network is
saved with save_model (safetensors + config.json) to --save-dir (default
<trainer.default_root_dir>/model; Joint saves model/level1 and model/level2).
--print-config shows the merged config. The global seed is 0 unless a config or an
override sets seed_everything (e.g. seed_everything=1).
"""

DEFAULT_SEED = 0
_ADAPTERS = ("Level1", "Level2", "Joint", "CellData", "NicheData", "JointData")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--save-dir", help="where the trained network is saved (default <default_root_dir>/model)")
    p.add_argument("--ckpt-path", help="Lightning checkpoint to resume from ('last' = the newest .ckpt under "
                   "trainer.default_root_dir)")
    p.add_argument("--config", action="append", required=True, metavar="FILE",
                   help="YAML config (repeatable; later files override earlier ones)")
    p.add_argument("--print-config", action="store_true", help="print the merged config and exit")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides, e.g. trainer.max_epochs=2 data.init_args.batch_size=32")


def __getattr__(name: str) -> Any:
    if name in _ADAPTERS:
        _define()
        return globals()[name]
    raise AttributeError(f"module 'xscale.cli.fit' has no attribute {name!r}")


def _load_many(datasets: list[str], *, exclude_holdout: bool, counts_layer: str | None, slide_key: str | None,
               gene_symbols: str | list[str | None] | None = None):
    """Bundled dataset names or paths -> AnnData list (held-out slides removed for bundled sets)."""
    from xscale.data.io import read_sources
    from xscale.errors import XscaleInputError

    if not datasets:
        raise XscaleInputError("data.datasets is empty; list bundled dataset names or .h5ad/.zarr paths.")
    return read_sources(datasets, gene_symbols=gene_symbols, exclude_holdout=exclude_holdout,
                        counts_layer=counts_layer, slide_key=slide_key, spatial_key=None)


def _check_same_genes(data_genes: list[str], model_genes: list[str], level1: str) -> None:
    """The data's gene vocabulary (``data.genes``, in order) must be the saved level-1 model's: the gene ids the
    data encodes index the model's gene embeddings."""
    from xscale.errors import XscaleInputError

    if data_genes == model_genes:
        return
    first = next((i for i, (a, b) in enumerate(zip(data_genes, model_genes, strict=False)) if a != b),
                 min(len(data_genes), len(model_genes)))
    at = (f"first difference at position {first}: data {data_genes[first] if first < len(data_genes) else None!r}, "
          f"model {model_genes[first] if first < len(model_genes) else None!r}")
    raise XscaleInputError(
        f"model.init_args.level1={level1!r}: its gene vocabulary ({len(model_genes)} genes) differs from the "
        f"data's ({len(data_genes)} genes; {at}), so the data's gene ids would index the wrong genes. Pass "
        f"data.init_args.level1={level1} (the same model) so that the data uses the model's vocabulary."
    )


def _slide_setup(adata, dataset: str, slide_key: str | None, *, what: str):
    """``(key, slides, holdout)`` of a niche dataset: the slide column used, each cell's slide label (None for
    one slide) and the bundled held-out slide (or None).

    ``slide_key`` (an obs column) names the slides of a user's own file; when None a bundled dataset keeps its
    own slide key. Niches never mix cells of different slides.
    """
    import xscale.datasets as ds
    from xscale.data.validate import check_slides
    from xscale.errors import XscaleInputError

    known = dataset in ds.available()
    default = ds.info(dataset).slide_key if known else None
    key = slide_key if slide_key is not None else default
    if key is None:
        return None, None, None
    if key not in adata.obs.columns:
        raise XscaleInputError(
            f"{what}: slide_key={key!r} is not an obs column of {dataset!r}; obs columns present: "
            f"{list(adata.obs.columns)}. Pass data.init_args.slide_key=<the column naming each cell's slide>, "
            "or leave it unset (null) for a single slide."
        )
    check_slides(adata, key)
    holdout = ds.info(dataset).holdout if known and key == default else None
    return key, adata.obs[key].astype(str).to_numpy(), holdout


def _define() -> None:
    """Define the adapter classes (imports Lightning) and publish them as module attributes."""
    if "Level1" in globals():
        return
    from typing import Literal

    import lightning
    import numpy as np

    from xscale.models.cell_to_tissue import CellToTissue, CellToTissueConfig
    from xscale.models.gene_to_cell import GeneToCell, GeneToCellConfig
    from xscale.train.joint import HierarchyModule, JointNicheDataset
    from xscale.train.level1 import CellDataModule, GeneCellModule
    from xscale.train.level2 import NicheDataModule, NicheDataset, TissueModule, make_niches

    Preset = Literal["tiny", "small", "base"]

    class Level1(GeneCellModule):
        """Level 1 (genes -> cells): ``GeneToCellConfig.preset(preset, genes=genes, **overrides)``.

        ``genes`` is linked from the data (``data.genes``); ``overrides`` sets any config field
        (e.g. ``{encoder: criss-cross, n_latents: 8}``).
        """

        def __init__(self, genes: list[str], preset: Preset = "small", overrides: dict[str, Any] | None = None,
                     lr: float = 2e-3, weight_decay: float = 0.01, warmup_fraction: float = 0.05,
                     seed: int = 0) -> None:
            cfg = GeneToCellConfig.preset(preset, genes=list(genes), **(overrides or {}))
            super().__init__(GeneToCell(cfg), lr=lr, weight_decay=weight_decay, warmup_fraction=warmup_fraction,
                             seed=seed)

        def setup(self, stage: str) -> None:
            """A CellData with ``max_genes: model`` trains with this model's context, as xscale run does."""
            super().setup(stage)
            dm = getattr(self.trainer, "datamodule", None)
            if getattr(dm, "max_genes_from_model", False):
                dm.max_genes = self.model.config.max_genes

    class Level2(TissueModule):
        """Level 2 (cells -> niches): ``CellToTissueConfig.preset(preset, in_dim=in_dim, **overrides)``.

        ``in_dim`` (K*D of the level-1 latents) and ``max_cells`` (cells per niche) are linked
        from the data (``data.in_dim``, ``data.max_cells``).
        """

        def __init__(self, in_dim: int, max_cells: int, preset: Preset = "small",
                     overrides: dict[str, Any] | None = None, lr: float = 1e-3, weight_decay: float = 1e-2) -> None:
            cfg = CellToTissueConfig.preset(preset, in_dim=int(in_dim), **{**(overrides or {}), "max_cells": max_cells})
            super().__init__(CellToTissue(cfg), lr=lr, weight_decay=weight_decay)

    class CellData(CellDataModule):
        """Cells of one or several datasets (bundled names or .h5ad/.zarr paths), panels may differ.

        ``exclude_holdout`` drops each bundled dataset's held-out slide (never trained on).
        ``max_genes``: the gene context of each training cell; ``"model"`` (the default) takes
        the level-1 model's own ``max_genes`` (its preset's: 192 for ``small``), as ``xscale run``
        and ``fit_level1`` do; an int sets it; None reads whole panels.
        ``gene_symbols``: the var column of gene symbols for datasets whose var_names are IDs
        (CELLxGENE: ``feature_name``); one name for all datasets, or a list with one entry per
        dataset (null where var_names are symbols already, as in the bundled sets).
        """

        def __init__(self, datasets: list[str], exclude_holdout: bool = True, val_fraction: float = 0.1,
                     max_genes: int | Literal["model"] | None = "model", batch_size: int = 64, num_workers: int = 0,
                     seed: int = 0, counts_layer: str | None = None, slide_key: str | None = None,
                     min_genes: int = 10, gene_symbols: str | list[str | None] | None = None) -> None:
            from xscale.data.anndata_dataset import vocab_from_adatas

            self.max_genes_from_model = max_genes == "model"  # set by Level1.setup, once the model exists
            max_genes = None if max_genes == "model" else max_genes

            adatas = _load_many(datasets, exclude_holdout=exclude_holdout, counts_layer=counts_layer,
                                slide_key=slide_key, gene_symbols=gene_symbols)
            self.vocab = vocab_from_adatas(adatas)
            built = CellDataModule.from_adatas(  # _load_many already put counts_layer's counts into X
                adatas, self.vocab, val_fraction=val_fraction, counts_layer=None, slide_key=slide_key,
                min_genes=min_genes, max_genes=max_genes, batch_size=batch_size, num_workers=num_workers, seed=seed,
            )
            super().__init__(built.train_dataset, built.val_dataset, max_genes=max_genes, batch_size=batch_size,
                             num_workers=num_workers, seed=seed)

        @property
        def genes(self) -> list[str]:
            return list(self.vocab.genes)

    class NicheData(NicheDataModule):
        """Niches of one spatial dataset, its cells embedded by a trained level-1 model.

        ``level1`` is a model directory written by ``save_model`` (e.g. DIR/checkpoints/level1).
        Training niches are centred on the cells outside the held-out slide (``exclude_holdout``).
        ``slide_key``: the obs column naming each cell's slide in a multi-slide file (niches never mix
        slides); None keeps a bundled dataset's own slide key, or treats a file as one slide.
        """

        def __init__(self, dataset: str, level1: str, exclude_holdout: bool = True, max_cells: int = 16,
                     radius: float | None = None, batch_size: int = 64, seed: int = 0,
                     slide_key: str | None = None) -> None:
            import xscale.tl
            from xscale.models.io import load_model

            adata = _load_many([dataset], exclude_holdout=False, counts_layer=None, slide_key=None)[0]
            _, slides, holdout = _slide_setup(adata, dataset, slide_key, what="NicheData")
            xscale.tl.embed_cells(adata, load_model(level1))
            latents = np.asarray(adata.obsm["X_xscale_cell"], dtype=np.float32).reshape(adata.n_obs, -1)
            keep = np.ones(adata.n_obs, bool) if not (exclude_holdout and holdout) else slides != holdout
            niches = make_niches(np.asarray(adata.obsm["spatial"], dtype=np.float64), np.flatnonzero(keep),
                                 max_cells=max_cells, slides=slides, radius=radius)
            self.in_dim, self.max_cells = int(latents.shape[1]), max_cells
            super().__init__(NicheDataset(latents, niches), batch_size=batch_size, seed=seed)

    class Joint(HierarchyModule):
        """Both levels trained together (``xscale.train.joint.HierarchyModule``).

        Starts from saved staged models when ``level1`` / ``level2`` name model directories,
        else from the presets (``genes`` linked from the data).
        """

        def __init__(self, genes: list[str], max_cells: int, level1_preset: Preset = "small",
                     level2_preset: Preset = "small", level1: str | None = None, level2: str | None = None,
                     lr: float = 5e-4, weight_decay: float = 1e-2, w_level1: float = 1.0, w_level2: float = 1.0,
                     w_counts: float = 1.0) -> None:
            from xscale.models.io import load_model

            l1 = load_model(level1) if level1 else GeneToCell(GeneToCellConfig.preset(level1_preset, genes=list(genes)))
            if level1:
                _check_same_genes(list(genes), list(l1.vocab.genes), level1)
            width = l1.config.latents_per_cell * l1.config.dim
            if level2:
                l2 = load_model(level2)
                l2.config.max_cells = max_cells  # niche size is the data's choice; the model takes any C
            else:
                l2 = CellToTissue(CellToTissueConfig.preset(level2_preset, in_dim=width, max_cells=max_cells))
            super().__init__(l1.train(), l2.train(), lr=lr, weight_decay=weight_decay, w_level1=w_level1,
                             w_level2=w_level2, w_counts=w_counts)

    class JointData(lightning.LightningDataModule):
        """Niches of one spatial dataset whose cells are read as counts (joint training).

        The gene vocabulary is the dataset's panel, or the one of ``level1`` (a saved model)
        when joint training starts from a staged level-1 model: give ``level1`` the same model
        as the Joint model's ``level1`` (their vocabularies must match).
        ``slide_key``: the obs column naming each cell's slide in a multi-slide file (niches never mix
        slides); None keeps a bundled dataset's own slide key, or treats a file as one slide.
        """

        def __init__(self, dataset: str, level1: str | None = None, exclude_holdout: bool = True,
                     max_cells: int = 16, max_genes: int | None = 256, radius: float | None = None,
                     batch_size: int = 16, seed: int = 0, slide_key: str | None = None) -> None:
            super().__init__()
            from xscale.data.anndata_dataset import AnnDataCellDataset, vocab_from_adatas
            from xscale.models.io import load_model

            adata = _load_many([dataset], exclude_holdout=False, counts_layer=None, slide_key=None)[0]
            slide_key, slides, holdout = _slide_setup(adata, dataset, slide_key, what="JointData")
            self.vocab = load_model(level1).vocab if level1 else vocab_from_adatas([adata])
            keep = np.ones(adata.n_obs, bool) if not (exclude_holdout and holdout) else slides != holdout
            niches = make_niches(np.asarray(adata.obsm["spatial"], dtype=np.float64), np.flatnonzero(keep),
                                 max_cells=max_cells, slides=slides, radius=radius)
            cells = AnnDataCellDataset(adata, self.vocab, slide_key=slide_key)
            self.dataset = JointNicheDataset(cells, niches, max_genes=max_genes, seed=seed)
            self.batch_size, self.seed, self.max_cells = batch_size, seed, max_cells

        @property
        def genes(self) -> list[str]:
            return list(self.vocab.genes)

        def train_dataloader(self):
            return self.dataset.loader(self.batch_size, shuffle=True, seed=self.seed)

    for cls in (Level1, Level2, Joint, CellData, NicheData, JointData):
        cls.__module__ = __name__
        cls.__qualname__ = cls.__name__
        globals()[cls.__name__] = cls


def build_cli(cli_args: list[str], *, run: bool = False):
    """A ``LightningCLI`` over the adapters (subclass mode), parsed from ``cli_args``.

    With ``run=False`` the model, data and trainer are instantiated but nothing is trained.
    """
    os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")
    import lightning
    from lightning.pytorch.cli import LightningCLI

    from xscale.train.checkpointing import SafeCheckpointIO

    _define()

    class XscaleCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            parser.link_arguments("data.genes", "model.init_args.genes", apply_on="instantiate")
            parser.link_arguments("data.in_dim", "model.init_args.in_dim", apply_on="instantiate")
            parser.link_arguments("data.max_cells", "model.init_args.max_cells", apply_on="instantiate")

    with warnings.catch_warnings():
        # xscale fit parses its own command line and hands LightningCLI the translated list;
        # Lightning warns whenever args= is given while sys.argv holds arguments too.
        warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended")
        return XscaleCLI(
            lightning.LightningModule, lightning.LightningDataModule, subclass_mode_model=True,
            subclass_mode_data=True, run=run, args=cli_args, save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
            parser_kwargs={"prog": "xscale fit"},  # its messages name the command to run, not "xscale"
            # a fixed default seed (override: seed_everything=N); without one, Lightning warns and picks 0
            seed_everything_default=DEFAULT_SEED,
            # checkpoints hold plain data only and are read back with torch.load(weights_only=True);
            # given by class path so that the saved config.yaml can record it
            trainer_defaults={"plugins": [{"class_path": f"{SafeCheckpointIO.__module__}.SafeCheckpointIO"}]},
        )


def _input_error_in(err: BaseException):
    """The XscaleInputError a config's class raised, found in the chain of ``err``, or None."""
    from xscale.errors import XscaleInputError

    seen = 0
    while err is not None and seen < 20:
        if isinstance(err, XscaleInputError):
            return err
        err, seen = err.__cause__ or err.__context__, seen + 1
    return None


def _config_error(err: BaseException) -> str | None:
    """The message of the error a config's class raised (e.g. ``Unknown GeneToCellConfig preset 'tinyy'``), when
    ``err`` is jsonargparse's wrapper of it (a ValueError raised while instantiating the configs); else None."""
    import traceback

    if not any("jsonargparse" in frame.filename for frame in traceback.extract_tb(err.__traceback__)):
        return None
    chain, seen = [], 0
    while err is not None and seen < 20:
        chain.append(err)
        err, seen = err.__cause__ or err.__context__, seen + 1
    for cause in reversed(chain):  # the innermost error raised outside jsonargparse: the class's own message
        frames = traceback.extract_tb(cause.__traceback__)
        if isinstance(cause, (ValueError, TypeError)) and frames and "jsonargparse" not in frames[-1].filename:
            return str(cause).strip().splitlines()[0] if str(cause).strip() else None
    lines = [ln.strip()[2:] for ln in str(chain[0]).splitlines() if ln.strip().startswith("- ")]
    useful = [ln for ln in lines if not ln.startswith("Expected a <class 'NoneType'>")]
    return "; ".join(useful) if useful else None


def _check_checkpoint_fits(ckpt: str | os.PathLike, model: Any) -> None:
    """``--ckpt-path``: the checkpoint must hold this model's parameters with the same shapes (another gene
    vocabulary or preset gives other shapes); :class:`XscaleInputError` naming the first mismatches otherwise."""
    from xscale.errors import XscaleInputError
    from xscale.train.checkpointing import load_lightning_checkpoint

    saved = load_lightning_checkpoint(ckpt).get("state_dict", {})
    current = model.state_dict()
    wrong = [f"{k} {tuple(saved[k].shape)} vs {tuple(current[k].shape)}" for k in current
             if k in saved and tuple(getattr(saved[k], "shape", ())) != tuple(current[k].shape)]
    missing = [k for k in current if k not in saved]
    if wrong or missing:
        vocab = [w for w in wrong if "log_theta" in w or "gene_embedder" in w]
        raise XscaleInputError(
            f"--ckpt-path {str(ckpt)!r}: expected a checkpoint of this model, found one of another "
            f"({len(wrong)} parameter(s) of other shapes, e.g. {wrong[:2]}; {len(missing)} missing, e.g. "
            f"{missing[:2]})" + ("; its gene vocabulary differs (e.g. another panel or gene_symbols)" if vocab else "")
            + ". Resume only with the configs that wrote it, or leave out --ckpt-path to start afresh"
            " (--ckpt-path last picks the newest .ckpt under the run's default_root_dir).")


def newest_checkpoint(root: str | os.PathLike) -> str:
    """The most recently written ``*.ckpt`` under ``root`` (a run's ``default_root_dir``).

    Lightning's own ``ckpt_path="last"`` looks only for ``last*.ckpt`` files, which its
    default checkpointing does not write, and then starts from scratch with a warning.
    """
    from pathlib import Path

    from xscale.errors import XscaleInputError

    found = sorted(Path(root).rglob("*.ckpt"), key=lambda p: p.stat().st_mtime) if Path(root).is_dir() else []
    if not found:
        raise XscaleInputError(
            f"--ckpt-path last: expected a Lightning checkpoint (*.ckpt) under trainer.default_root_dir "
            f"{str(root)!r}, found none. Run without --ckpt-path to start afresh, or name a .ckpt file."
        )
    return str(found[-1])


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from xscale.errors import XscaleInputError
    from xscale.models.io import save_model

    cli_args = [f"--config={c}" for c in args.config]
    for item in args.overrides:
        if "=" not in item or item.startswith("-"):
            raise XscaleInputError(f"Override {item!r} is not KEY=VALUE (e.g. trainer.max_epochs=2).")
        cli_args.append(f"--{item}")
    if args.print_config:
        cli_args.append("--print_config")
    from xscale.train.quiet import quiet_fit

    with quiet_fit():  # Lightning's notes that say nothing to the user (see xscale.train.quiet)
        try:
            cli = build_cli(cli_args, run=False)
        except ValueError as err:  # jsonargparse wraps what a data / model class raised when instantiated
            cause = _input_error_in(err)
            if cause is not None:
                raise cause from None
            message = _config_error(err)
            if message is None:
                raise
            raise XscaleInputError(
                f"the configs did not instantiate: {message} Fix that key in the --config files or the KEY=VALUE "
                "overrides; --print-config shows the merged config."
            ) from None
        except SystemExit as exit_:
            if exit_.code in (0, None):
                return 0
            raise XscaleInputError(
                "the configs above did not parse (see the message printed by LightningCLI). The same --config "
                "files with --print-config show every key they accept, with its current value."
            ) from None
        ckpt = newest_checkpoint(cli.trainer.default_root_dir) if args.ckpt_path == "last" else args.ckpt_path
        if ckpt is not None:
            _check_checkpoint_fits(ckpt, cli.model)  # before training: a one-line error, not a state_dict traceback
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt)
    save_dir = Path(args.save_dir) if args.save_dir else Path(cli.trainer.default_root_dir) / "model"
    if cli.trainer.is_global_zero:
        if hasattr(cli.model, "level2"):  # joint: both levels, in the layout xscale embed reads
            save_model(cli.model.level1, save_dir / "level1")
            save_model(cli.model.level2, save_dir / "level2")
        else:
            save_model(cli.model.model, save_dir)
        print(f"saved the trained model(s) to {save_dir}")
    return 0
