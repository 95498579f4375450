"""PNG charts of a harness run (matplotlib, Agg backend: no display needed).

``throughput.png``: per scenario, the server's rate next to its ceilings (pgbench running
the same SQL, the bare Starlette endpoint) at each client count. ``latency.png``: per
scenario, the server's p50/p90/p99 next to pgbench's for the same transaction. Each
scenario has its own linear axis and every bar carries its value, so a ceiling 100x
above the server is still readable.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

__all__ = ["write_charts"]


_COLORS = {
    "server": "C0",
    "pgbench same SQL": "C1",
    "bare Starlette": "C2",
    "pgbench minimal transaction": "C3",
    "pgbench minimal + same commit SQL": "C4",
}


def _grid(count: int) -> tuple[int, int]:
    cols = min(3, count)
    return math.ceil(count / cols), cols


def write_charts(rows: list[dict[str, Any]], directory: Path) -> list[Path]:
    """Write the charts for ``rows`` (the harness's median rows); return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(f"{row['scenario']} ({row['strategy']})", []).append(row)
    if not groups:
        return []
    nrows, ncols = _grid(len(groups))
    written = []

    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows), squeeze=False)
    for ax, (title, items) in zip(axes.flat, groups.items(), strict=False):
        labels = [str(r["clients"]) for r in items]
        series = [("server", [r["rate"] for r in items])]
        for name in items[0]["ceilings"]:
            series.append((name, [r["ceilings"].get(name, {}).get("rate", 0) for r in items]))
        if items[0].get("bare_rate"):
            series.append(("bare Starlette", [r.get("bare_rate") or 0 for r in items]))
        width = 0.8 / len(series)
        for i, (name, values) in enumerate(series):
            xs = [x + (i - (len(series) - 1) / 2) * width for x in range(len(labels))]
            bars = ax.bar(xs, values, width, label=name, color=_COLORS.get(name))
            ax.bar_label(bars, fmt="%.0f", fontsize=7)
        ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel("clients")
        ax.set_ylabel(f"{items[0]['unit']}/s")
        ax.margins(y=0.15)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=6, loc="upper left")
    for ax in list(axes.flat)[len(groups) :]:
        ax.axis("off")
    fig.suptitle("Throughput (medians) against ceilings measured in the same run")
    fig.tight_layout()
    path = directory / "throughput.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    written.append(path)

    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows), squeeze=False)
    for ax, (title, items) in zip(axes.flat, groups.items(), strict=False):
        labels = [str(r["clients"]) for r in items]
        series = [(f"server {q}", [r[q] for r in items]) for q in ("p50", "p90", "p99")]
        first = next(iter(items[0]["ceilings"]), None)
        if first is not None:
            series += [
                (f"pgbench {q}", [r["ceilings"][first][q] for r in items]) for q in ("p50", "p99")
            ]
        width = 0.8 / len(series)
        for i, (name, values) in enumerate(series):
            xs = [x + (i - (len(series) - 1) / 2) * width for x in range(len(labels))]
            hatch = "//" if name.startswith("pg") else None
            bars = ax.bar(xs, values, width, label=name, hatch=hatch)
            ax.bar_label(bars, fmt="%.0f", fontsize=7)
        ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel("clients")
        ax.set_ylabel("ms")
        ax.margins(y=0.15)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=6, loc="upper left")
    for ax in list(axes.flat)[len(groups) :]:
        ax.axis("off")
    fig.suptitle("Latency percentiles (medians of runs)")
    fig.tight_layout()
    path = directory / "latency.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    written.append(path)
    return written
