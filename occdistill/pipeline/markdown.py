"""Number formats shared by the demo report's sections."""

from __future__ import annotations


def pct(v: float | None) -> str:
    """A metric in percent with two decimals; ``n/a`` where it was not computed."""
    return "n/a" if v is None else f"{v:.2f}"


def ms_cell(median: float | None, p90: float | None) -> str:
    """``median (p90)`` of a latency in ms; ``n/a`` where it was not measured."""
    return "n/a" if median is None else f"{median:.1f} ({p90:.1f})"
