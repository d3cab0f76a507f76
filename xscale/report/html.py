"""Self-contained HTML: inline CSS, figures as base64 PNG ``data:`` URIs, nothing fetched."""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from html import escape
from typing import TYPE_CHECKING

from xscale.report.metrics import (
    METRIC_INFO,
    ComparisonGroup,
    format_value,
    is_xscale,
    method_label,
    metric_label,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CSS = """
:root { --ink:#1f2933; --muted:#5f6b7a; --accent:#d95f02; --line:#e3e7ec; --hold:#c0392b; }
* { box-sizing: border-box; }
body { margin:0; font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif;
       color:var(--ink); background:#f6f7f9; line-height:1.5; }
header { background:#1f2933; color:#fff; padding:28px 48px 22px; }
header h1 { margin:0 0 4px; font-size:28px; letter-spacing:.5px; }
header p { margin:0; color:#cfd6de; }
nav { background:#fff; border-bottom:1px solid var(--line); padding:10px 48px; position:sticky; top:0; }
nav a { color:var(--ink); text-decoration:none; margin-right:18px; font-size:14px; }
nav a:hover { color:var(--accent); }
main { max-width:1240px; margin:0 auto; padding:12px 48px 48px; }
section { background:#fff; border:1px solid var(--line); border-radius:8px; padding:18px 26px; margin:22px 0; }
h2 { margin:0 0 8px; font-size:21px; border-left:5px solid var(--accent); padding-left:10px; }
h3 { font-size:16px; margin:18px 0 6px; }
.lead { color:var(--muted); margin-top:0; }
figure { margin:12px 0 4px; }
figure img { max-width:100%; height:auto; display:block; margin:0 auto; border:1px solid var(--line); }
figcaption { color:var(--muted); font-size:14px; margin-top:8px; }
figcaption b { color:var(--ink); }
table { border-collapse:collapse; font-size:14px; margin:8px 0 14px; }
th, td { border-bottom:1px solid var(--line); padding:5px 12px; text-align:right; }
th:first-child, td:first-child { text-align:left; }
th { background:#f0f2f5; }
tr.xscale td:first-child { color:var(--accent); font-weight:600; }
td.best { font-weight:700; }
.note { background:#fff8e6; border-left:4px solid #f0b429; padding:8px 12px; color:#6b5200; }
.holdout { color:var(--hold); font-weight:600; }
.summary li { margin:4px 0; }
dl.glossary dt { font-weight:600; margin-top:6px; }
dl.glossary dd { margin:0 0 4px 16px; color:var(--muted); }
details pre { background:#f0f2f5; padding:10px; overflow:auto; font-size:12px; }
footer { color:var(--muted); font-size:12px; text-align:center; padding:18px; }
"""


def figure_to_data_uri(fig: Figure, *, dpi: int = 110) -> str:
    """PNG of ``fig`` as a ``data:image/png;base64,...`` URI."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, facecolor="white")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def figure_html(fig: Figure, caption: str, *, alt: str) -> str:
    """``<figure>`` with the embedded PNG and a caption (caption is trusted HTML)."""
    return (
        f'<figure><img alt="{escape(alt)}" src="{figure_to_data_uri(fig)}">'
        f"<figcaption>{caption}</figcaption></figure>"
    )


def note(text: str) -> str:
    """A highlighted 'not available' box; ``text`` is trusted HTML."""
    return f'<p class="note">{text}</p>'


def key_value_table(rows: Mapping[str, str], *, header: tuple[str, str] | None = None) -> str:
    head = f"<tr><th>{escape(header[0])}</th><th>{escape(header[1])}</th></tr>" if header else ""
    body = "".join(f"<tr><td>{escape(k)}</td><td>{escape(v)}</td></tr>" for k, v in rows.items())
    return f"<table>{head}{body}</table>"


def rows_table(
    header: Sequence[str], rows: Sequence[Sequence[str]], *, row_classes: Sequence[str] = ()
) -> str:
    """A table of already formatted strings (escaped here)."""
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    out = [f"<table><tr>{head}</tr>"]
    for i, r in enumerate(rows):
        cls = f' class="{row_classes[i]}"' if i < len(row_classes) and row_classes[i] else ""
        out.append(f"<tr{cls}>" + "".join(f"<td>{escape(c)}</td>" for c in r) + "</tr>")
    out.append("</table>")
    return "".join(out)


def group_table(g: ComparisonGroup) -> str:
    """One comparison group as a table; the best value of each metric in bold."""
    metrics = g.metric_names
    head = (
        "<tr><th>method</th>"
        + "".join(f"<th>{escape(metric_label(m))}</th>" for m in metrics)
        + "</tr>"
    )
    best = {m: g.best(m) for m in metrics}
    body = []
    for name, vals in g.methods.items():
        cls = ' class="xscale"' if is_xscale(name) else ""
        cells = []
        for m in metrics:
            v = vals.get(m)
            txt = "–" if v is None else format_value(v)
            cells.append(f'<td class="best">{txt}</td>' if best[m] == name else f"<td>{txt}</td>")
        body.append(f"<tr{cls}><td>{escape(method_label(name))}</td>{''.join(cells)}</tr>")
    ctx = ""
    if g.context:
        ctx = (
            "<p class='lead'>"
            + ", ".join(
                f"{escape(k.replace('_', ' '))}: {escape(f'{int(v):,}' if float(v).is_integer() else format_value(v))}"
                for k, v in g.context.items()
            )
            + "</p>"
        )
    return f"<h3>{escape(g.title)}</h3>{ctx}<table>{head}{''.join(body)}</table>"


def glossary(metric_names: Sequence[str]) -> str:
    """Definitions of the metrics that appear in the report."""
    items = []
    for m in dict.fromkeys(x.lower() for x in metric_names):
        if m in METRIC_INFO:
            name, direction, text = METRIC_INFO[m]
            items.append(f"<dt>{escape(name)} ({direction} is better)</dt><dd>{escape(text)}</dd>")
    return f"<dl class='glossary'>{''.join(items)}</dl>" if items else ""


@dataclass
class Page:
    """Sections of the report in order; ``render`` gives the whole document."""

    title: str
    subtitle: str
    sections: list[tuple[str, str, str]] = field(default_factory=list)  # (id, heading, body html)

    def add(self, section_id: str, heading: str, body: str) -> None:
        self.sections.append((section_id, heading, body))

    def render(self, footer: str) -> str:
        nav = "".join(f'<a href="#{sid}">{escape(h)}</a>' for sid, h, _ in self.sections)
        body = "".join(
            f'<section id="{sid}"><h2>{escape(h)}</h2>{html}</section>'
            for sid, h, html in self.sections
        )
        return (
            '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{escape(self.title)}</title><style>{CSS}</style></head><body>"
            f"<header><h1>{escape(self.title)}</h1><p>{escape(self.subtitle)}</p></header>"
            f"<nav>{nav}</nav><main>{body}</main><footer>{footer}</footer></body></html>\n"
        )
