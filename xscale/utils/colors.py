"""Categorical colours for every plot xscale draws (report figures, ``xscale.tl.plot_domains``)."""
from __future__ import annotations


def palette(n: int) -> list[str]:
    """``n`` distinct hex colours: tab10 up to 10, tab20 up to 20, then scanpy's 28- and 102-colour
    palettes (designed to keep neighbouring categories apart; scanpy comes with squidpy), then evenly
    spaced hues beyond 102 (distinct but hard to tell apart: too many categories for one plot)."""
    import matplotlib

    if n <= 20:
        cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
        return [matplotlib.colors.to_hex(cmap(i)) for i in range(n)]
    if n <= 102:
        from scanpy.plotting.palettes import default_28, default_102

        chosen = default_28 if n <= 28 else default_102
        return [matplotlib.colors.to_hex(c) for c in chosen[:n]]
    cmap = matplotlib.colormaps["hsv"]
    return [matplotlib.colors.to_hex(cmap(i / n)) for i in range(n)]
