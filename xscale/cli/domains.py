"""``xscale domains``: re-cluster a store's niche latents into N spatial domains."""
from __future__ import annotations

import argparse

HELP = "re-cluster a latent store's niche latents into N spatial domains"
DESCRIPTION = """\
Cluster obsm["X_xscale_niche"] of a latent store (all slides together, so domain ids are
comparable across slides) and write the labels to obs[--key-added] (default
"xscale_domain"). The store is rewritten under a temporary name and swapped in when
complete; --out writes a new store instead (for a store of xscale prepare, a copy of it,
made file by file and clustered block by block). With --label-key, prints the ARI/NMI of the
domains against that annotation. Each slide's latents are centred first (so a slide-wide
shift is not a domain, as in xscale run / demo): the slides of --slide-key, by default the
slide key the store records (uns["xscale"]["slide_key"]); --no-slide-center turns that off.

example: xscale domains --store xscale-demo/cells.zarr --n-domains 6 --key-added xscale_domain_6
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--store", required=True, help="latent store (DIR/cells.zarr)")
    p.add_argument("--n-domains", "-n", type=int, required=True, help="number of domains")
    p.add_argument("--method", choices=("kmeans", "gmm"), default="kmeans", help="clustering (default kmeans)")
    p.add_argument("--use-rep", default="X_xscale_niche", help="obsm key to cluster (default X_xscale_niche)")
    p.add_argument("--key-added", default="xscale_domain",
                   help="obs column written (default xscale_domain); an existing column is replaced only if xscale "
                        "wrote it (its name starts with xscale_, or xscale domains wrote it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slide-key", help="obs column of slides whose latents are centred before clustering "
                   "(default: the slide key the store records, if any)")
    p.add_argument("--no-slide-center", action="store_true",
                   help="cluster the latents as they are (e.g. for slides of different regions)")
    p.add_argument("--label-key", help="obs column of annotated domains: print ARI/NMI against it")
    p.add_argument("--out", help="write the result to this new store instead of updating --store")


#: Where a store records the obs columns ``xscale domains`` wrote (AnnData zarr: uns["xscale"][...]; prepared
#: store: an attribute of its obs group), so that a later run may replace them.
WRITTEN_KEY = "domains_keys"


def check_key_added(key: str, columns, written) -> None:
    """--key-added may name a new obs column, or one xscale wrote (``xscale_*`` or recorded by domains); never the
    user's own annotation."""
    from xscale.errors import XscaleInputError

    if key not in list(columns) or key.startswith("xscale_") or key in {str(k) for k in written}:
        return
    raise XscaleInputError(f"--key-added {key!r}: expected a new obs column or one xscale wrote, found an existing "
                           "column xscale did not write (your annotation?), which would be replaced by domain ids. "
                           f"Pass another --key-added (e.g. xscale_domain_{key}).")


def _written_keys(adata) -> list[str]:
    meta = adata.uns.get("xscale")
    keys = meta.get(WRITTEN_KEY, []) if isinstance(meta, dict) else []
    return [str(k) for k in ([keys] if isinstance(keys, str) else list(keys))]


def _record_written(adata, key: str) -> None:
    meta = dict(adata.uns["xscale"]) if isinstance(adata.uns.get("xscale"), dict) else {}
    keys = _written_keys(adata)
    meta[WRITTEN_KEY] = [*keys, key] if key not in keys else keys
    adata.uns["xscale"] = meta


def _slide_key(adata, given: str | None) -> str | None:
    """--slide-key, checked; else the slide key the store records (xscale run / demo / embed), if in obs."""
    from xscale.errors import XscaleInputError

    if given is not None:
        if given not in adata.obs:
            raise XscaleInputError(f"--slide-key {given!r} not in the store's obs. Available: "
                                   f"{list(adata.obs.columns)}. Omit it for a single slide.")
        return given
    from xscale.tl.niches import recorded_slide_key

    return recorded_slide_key(adata)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import anndata as ad
    import numpy as np

    import xscale.tl
    from xscale.data.store import is_prepared_store
    from xscale.data.writeback import write_anndata_zarr
    from xscale.errors import XscaleInputError
    from xscale.utils.atomic import check_replaceable

    store = Path(args.store)
    if not store.exists():
        raise XscaleInputError(f"Store {str(store)!r} does not exist. Pass the cells.zarr written by xscale demo/run.")
    if args.n_domains < 2:
        raise XscaleInputError(f"--n-domains must be >= 2; got {args.n_domains}.")
    if is_prepared_store(store):
        if args.out is not None:
            return _prepared_store_copy(args, store, Path(args.out))
        from xscale.data.store import CellStore

        cells = CellStore(store)
        labels = _prepared_labels(args, cells)
        _prepared_store(args, cells, labels)
        print(f"wrote obs[{args.key_added!r}] into {store} (block by block)")
        return 0
    check_replaceable(args.out or store)  # before any work: never the user's own zarr store
    try:
        adata = ad.read_zarr(store)
    except Exception as err:  # a damaged zarr raises many types
        raise XscaleInputError(f"Could not read {str(store)!r} as an AnnData zarr store: {err}") from err
    if args.label_key and args.label_key not in adata.obs:  # checked before any work
        raise XscaleInputError(f"--label-key {args.label_key!r} not in the store's obs. "
                               f"Available: {list(adata.obs.columns)}.")
    check_key_added(args.key_added, adata.obs.columns, _written_keys(adata))
    if args.use_rep in adata.obsm and np.asarray(adata.obsm[args.use_rep]).ndim > 2:
        adata.obsm[args.use_rep] = np.asarray(adata.obsm[args.use_rep]).reshape(adata.n_obs, -1)
    slide_key = None if args.no_slide_center else _slide_key(adata, args.slide_key)
    xscale.tl.domains(adata, args.n_domains, key_added=args.key_added, use_rep=args.use_rep,
                      method=args.method, seed=args.seed, slide_key=slide_key)
    if slide_key is not None:
        print(f"latents centred per slide of obs[{slide_key!r}] ({adata.obs[slide_key].nunique()} slides)")
    counts = adata.obs[args.key_added].value_counts().sort_index()
    print(f"{args.n_domains} domains in obs[{args.key_added!r}]: " + ", ".join(f"{k}: {v}" for k, v in counts.items()))
    if args.label_key:
        from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

        m = adata.obs[args.label_key].notna().to_numpy()
        y, d = adata.obs[args.label_key].astype(str)[m], adata.obs[args.key_added].astype(str)[m]
        print(f"against {args.label_key} ({int(m.sum())} labelled cells): ARI {adjusted_rand_score(y, d):.3f}, "
              f"NMI {normalized_mutual_info_score(y, d):.3f}")
    _record_written(adata, args.key_added)
    write_anndata_zarr(adata, args.out or store)  # the old store is replaced only once this one is complete
    print(f"wrote {args.out or store}")
    return 0


def _prepared_store_copy(args: argparse.Namespace, store, out) -> int:
    """--out with a prepared store: the store is copied file by file (never loaded) under a temporary name
    beside ``out``, clustered there block by block, and renamed to ``out`` when complete; ``store`` is not
    touched. ``out`` may not be ``store`` itself, nor something that is not an xscale output."""
    import shutil

    from xscale.data.store import CellStore
    from xscale.errors import XscaleInputError
    from xscale.utils.atomic import atomic_dir

    if out.resolve() == store.resolve():
        raise XscaleInputError(f"--out {str(out)!r} is --store itself; expected a new path. Omit --out to write "
                               "the domains into the store.")
    labels = _prepared_labels(args, CellStore(store))  # bad options fail before the copy
    with atomic_dir(out, marker=False) as tmp:
        shutil.copytree(store, tmp, dirs_exist_ok=True)
        _prepared_store(args, CellStore(tmp), labels)
    print(f"wrote {out}: a copy of {store} with obs[{args.key_added!r}] (block by block)")
    return 0


def _prepared_labels(args: argparse.Namespace, cells):
    """Check the options against a prepared store (a CellStore) before any work; returns obs[--label-key] (or
    None)."""
    from anndata.io import read_elem

    from xscale.errors import XscaleInputError

    if args.slide_key is not None:
        raise XscaleInputError(f"--slide-key: {cells.path} is a prepared store, whose slides are fixed by xscale "
                               "prepare and centred by default; expected no --slide-key, found it. Omit it (or pass "
                               "--no-slide-center).")
    obs_attrs = cells.root["obs"].attrs
    check_key_added(args.key_added, obs_attrs.get("column-order", []), obs_attrs.get(WRITTEN_KEY, []))
    if args.use_rep not in cells.root["obsm"]:
        raise XscaleInputError(f"--use-rep {args.use_rep!r} not in the store's obsm. Available: "
                               f"{sorted(cells.root['obsm'])}. Embed the store first (xscale embed / xscale run).")
    if not args.label_key:
        return None
    obs = read_elem(cells.root["obs"])
    if args.label_key not in obs:
        raise XscaleInputError(f"--label-key {args.label_key!r} not in the store's obs. "
                               f"Available: {list(obs.columns)}.")
    return obs[args.label_key]


def _prepared_store(args: argparse.Namespace, cells, labels) -> None:
    """A prepared store (a CellStore), in place, block by block: only its latents are read
    (:func:`xscale.train.store_run.store_domains`); the store's own slides are centred. ``labels``: obs[--label-key]
    or None (:func:`_prepared_labels`)."""
    import numpy as np

    from xscale.train.store_run import store_domains

    domains = store_domains(cells, args.n_domains, key=args.use_rep, key_added=args.key_added,
                            slide_center=not args.no_slide_center, method=args.method, seed=args.seed)
    import zarr

    obs = zarr.open_group(cells.path / "obs", mode="r+")  # recorded: a later run may replace this column
    written = [str(k) for k in obs.attrs.get(WRITTEN_KEY, [])]
    if args.key_added not in written:
        obs.attrs[WRITTEN_KEY] = [*written, args.key_added]
    if not args.no_slide_center and len(cells.slide_names) > 1:
        print(f"latents centred per slide of the store ({len(cells.slide_names)} slides)")
    values, counts = np.unique(domains, return_counts=True)
    print(f"{args.n_domains} domains in obs[{args.key_added!r}]: "
          + ", ".join(f"{v}: {c}" for v, c in zip(values, counts, strict=True)))
    if labels is not None:
        from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

        m = labels.notna().to_numpy()
        y, d = labels.astype(str).to_numpy()[m], domains[m].astype(str)
        print(f"against {args.label_key} ({int(m.sum())} labelled cells): ARI {adjusted_rand_score(y, d):.3f}, "
              f"NMI {normalized_mutual_info_score(y, d):.3f}")
