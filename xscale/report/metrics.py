"""Read the loose, nested ``metrics`` dict into comparison groups the report can draw.

Schema (loose on purpose; writers may nest as they like)
---------------------------------------------------------
A JSON-ready nested dict. Any dict whose children include at least one *method* dict
(a dict whose values are all numbers) is a **comparison group**: its method children are
compared with one another, its number children are shown as context (e.g. ``n_domains``).
Groups may sit at any depth; the path of keys to a group names it. Examples::

    {"dataset": "starmap_mpfc", "holdout": "20180424_BZ14_control",
     "domains": {"n_domains": 4,
                 "xscale_niche": {"ari": 0.76, "nmi": 0.71},
                 "pca_spatial_mean": {"ari": 0.715, "nmi": 0.68}},
     "cell_type": {"xscale_cell": {"macro_f1": 0.61, "accuracy": 0.80},
                   "pca": {"macro_f1": 0.55, "accuracy": 0.77}}}

    {"domains": {"heldout": {"xscale_niche": {...}, "pca": {...}},
                 "20180417_BZ5_control": {"xscale_niche": {...}, ...}},
     "reconstruction": {"heldout": {"xscale": {"pearson_gene": 0.42, "nb_nll": 1.9}}}}

Methods whose name starts with ``xscale`` are xscale's own; all others are baselines.
Top-level strings, numbers and dicts of numbers (e.g. ``"seconds": {"level1": 41.2}``) are
run information. Lists and other values are kept in the
raw JSON shown at the end of the report and are otherwise ignored.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xscale.errors import XscaleInputError

# Known metric names: (display name, direction, explanation for a biologist).
METRIC_INFO: dict[str, tuple[str, str, str]] = {
    "ari": (
        "ARI",
        "higher",
        "adjusted Rand index between clusters and annotation: 1 = identical partition, 0 = chance",
    ),
    "nmi": (
        "NMI",
        "higher",
        "normalised mutual information between clusters and annotation (0 to 1)",
    ),
    "macro_f1": (
        "macro F1",
        "higher",
        "F1 score averaged over cell types, so rare types count as much as common ones",
    ),
    "accuracy": (
        "accuracy",
        "higher",
        "fraction of held-out cells whose type is predicted correctly",
    ),
    "knn_purity": (
        "kNN purity",
        "higher",
        "fraction of each cell's nearest latent neighbours sharing its label",
    ),
    "slide_mixing": (
        "slide mixing",
        "higher",
        "entropy of slide labels among latent neighbours (1 = slides well mixed)",
    ),
    "pearson": ("Pearson r", "higher", "correlation between observed and decoded expression"),
    "pearson_gene": (
        "Pearson r (per gene)",
        "higher",
        "correlation across cells per gene, averaged over genes",
    ),
    "pearson_cell": (
        "Pearson r (per cell)",
        "higher",
        "correlation across genes per cell, averaged over cells",
    ),
    "spearman": (
        "Spearman ρ",
        "higher",
        "rank correlation between observed and decoded expression",
    ),
    "nb_nll": (
        "NB NLL",
        "lower",
        "negative-binomial negative log-likelihood of the counts per gene (nats)",
    ),
    "nll": ("NLL", "lower", "negative log-likelihood of the counts (nats)"),
    "mse": ("MSE", "lower", "mean squared error"),
    "loss": ("loss", "lower", "training objective"),
    "seconds": ("time (s)", "lower", "wall-clock seconds"),
    "peak_mem_mb": ("peak memory (MB)", "lower", "peak resident memory"),
}

METHOD_NAMES: dict[str, str] = {
    "xscale_niche": "xscale niche latents",
    "xscale_domain": "xscale domains (as clustered)",
    "xscale_cell": "xscale cell latents",
    "xscale_cell_spatial_mean": "xscale cell latents, spatial mean",
    "xscale": "xscale",
    "pca": "PCA of expression",
    "pca_spatial_mean": "PCA, mean over 10 spatial neighbours",
}


def method_label(name: str) -> str:
    """Readable name of a method key (``pca_spatial_mean`` -> ``PCA, mean over ...``)."""
    return METHOD_NAMES.get(name, name.replace("_", " "))


def metric_label(name: str) -> str:
    """Readable name of a metric key, with its direction when known (``ari`` -> ``ARI ↑``)."""
    info = METRIC_INFO.get(name.lower())
    if info is None:
        return name.replace("_", " ")
    return f"{info[0]} {'↑' if info[1] == 'higher' else '↓'}"


def higher_is_better(name: str) -> bool | None:
    """True/False for known metrics, None when the direction is unknown."""
    info = METRIC_INFO.get(name.lower())
    return None if info is None else info[1] == "higher"


def is_xscale(method: str) -> bool:
    """Whether a method key names one of xscale's own outputs."""
    return method.lower().startswith("xscale")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_method(v: Any) -> bool:
    return isinstance(v, Mapping) and len(v) > 0 and all(_is_number(x) for x in v.values())


@dataclass
class ComparisonGroup:
    """Methods compared on the same task and cells.

    Attributes
    ----------
    path
        Keys leading to the group, e.g. ``("domains", "heldout")``.
    methods
        ``{method: {metric: value}}`` in the order written.
    context
        Numbers written beside the methods (e.g. ``{"n_domains": 4}``).
    """

    path: tuple[str, ...]
    methods: dict[str, dict[str, float]]
    context: dict[str, float] = field(default_factory=dict)

    @property
    def title(self) -> str:
        return " / ".join(p.replace("_", " ") for p in self.path) or "metrics"

    @property
    def metric_names(self) -> list[str]:
        names: list[str] = []
        for m in self.methods.values():
            names.extend(k for k in m if k not in names)
        return names

    def best(self, metric: str) -> str | None:
        """Method with the best value of ``metric`` (None when the direction is unknown)."""
        hib = higher_is_better(metric)
        vals = {
            k: v[metric]
            for k, v in self.methods.items()
            if metric in v and math.isfinite(v[metric])
        }
        if hib is None or not vals:
            return None
        return (max if hib else min)(vals, key=vals.__getitem__)


def load_metrics(metrics: Mapping[str, Any] | str | Path | None) -> dict[str, Any]:
    """A metrics dict, or the JSON file holding one; ``None`` gives ``{}``."""
    if metrics is None:
        return {}
    if isinstance(metrics, (str, Path)):
        p = Path(metrics)
        if not p.is_file():
            raise XscaleInputError(
                f"metrics file {str(p)!r} not found. Pass a dict or the path of a metrics.json "
                "(as written by `xscale demo` or `xscale run`)."
            )
        try:
            loaded = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise XscaleInputError(f"metrics file {str(p)!r} is not valid JSON ({e}).") from e
        metrics = loaded
    if not isinstance(metrics, Mapping):
        raise XscaleInputError(
            f"metrics: expected a dict (nested, numbers at the leaves), found {type(metrics).__name__}."
        )
    return dict(metrics)


def comparison_groups(metrics: Mapping[str, Any]) -> list[ComparisonGroup]:
    """Every comparison group in ``metrics``, depth first, in the order written."""
    groups: list[ComparisonGroup] = []

    def walk(node: Mapping[str, Any], path: tuple[str, ...]) -> None:
        methods = {
            str(k): {str(m): float(x) for m, x in v.items()}
            for k, v in node.items()
            if _is_method(v)
        }
        if methods and path:  # numeric dicts at the top level are run information, not methods
            context = {str(k): float(v) for k, v in node.items() if _is_number(v)}
            groups.append(ComparisonGroup(path, methods, context))
        for k, v in node.items():
            if isinstance(v, Mapping) and not _is_method(v):
                walk(v, (*path, str(k)))

    walk(metrics, ())
    return groups


def run_info(metrics: Mapping[str, Any]) -> dict[str, str]:
    """Top-level strings and numbers of ``metrics`` (run information), formatted."""
    out: dict[str, str] = {}
    for k, v in metrics.items():
        if isinstance(v, str):
            out[str(k)] = v
        elif _is_number(v):
            out[str(k)] = format_value(float(v))
        elif _is_method(v):  # e.g. {"seconds": {"level1": 41.2, "level2": 30.5}}
            out[str(k)] = ", ".join(f"{kk}: {format_value(float(x))}" for kk, x in v.items())
    return out


def format_value(v: float) -> str:
    """Three significant decimals for scores, thousands separators for counts."""
    if not math.isfinite(v):
        return "–"
    if float(v).is_integer() and abs(v) >= 10:
        return f"{int(v):,}"
    if abs(v) >= 100:
        return f"{v:,.1f}"
    return f"{v:.3f}"


def headline(groups: list[ComparisonGroup]) -> list[str]:
    """One plain sentence per group: xscale's best against the best baseline, on the first metric."""
    lines: list[str] = []
    for g in groups:
        for metric in g.metric_names:
            hib = higher_is_better(metric)
            if hib is None:
                continue
            own = {k: v[metric] for k, v in g.methods.items() if is_xscale(k) and metric in v}
            base = {k: v[metric] for k, v in g.methods.items() if not is_xscale(k) and metric in v}
            if not own or not base:
                break
            pick = max if hib else min
            o, b = pick(own, key=own.__getitem__), pick(base, key=base.__getitem__)
            diff = own[o] - base[b]
            better = diff > 0 if hib else diff < 0
            lines.append(
                f"<b>{g.title}</b>: {method_label(o)} {metric_label(metric)} = {format_value(own[o])} "
                f"vs best baseline ({method_label(b)}) {format_value(base[b])} "
                f"({'+' if diff >= 0 else '−'}{abs(diff):.3f}, {'better' if better else 'not better'})."
            )
            break
    return lines
