"""The report's plots (matplotlib, Agg), drawn so that noise does not look like an effect:
differences are shown with their 95% CI around a zero line, on an axis at least ±MIN_DELTA_SPAN
wide, with the grid's resolvable difference shaded; absolute AUROC on a fixed 0.5-1 axis. Real
sizes are categories on the x axis (their spacing says nothing)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dermaflux.core.artifacts import atomic_path
from dermaflux.evaluate.metrics import PAIRED_METRICS
from dermaflux.evaluate.paired import REAL_ONLY

MIN_DELTA_SPAN = 0.1  # a Δ axis never zooms in closer than ±0.1
STYLE = {"synthetic": "-s", "real-extra": "--^", "shuffled": ":v", "matched": "-.D"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _panel_grid(rows: list[dict]):
    """One subplot per (task, model, test set), the internal test set first: (figure, [(axes, the panel's
    rows, title)]), or None without rows."""
    keys = sorted({(r["task"], r["model"], r["test_set"]) for r in rows},
                  key=lambda k: (k[0], k[1], k[2] != "internal", k[2]))
    if not keys:
        return None
    fig, axes = _pyplot().subplots(1, len(keys), figsize=(5.5 * len(keys), 4), squeeze=False)
    return fig, [(ax, [r for r in rows if (r["task"], r["model"], r["test_set"]) == key], " · ".join(key))
                 for ax, key in zip(axes[0], keys)]


def _label(ax, ylabel: str, title: str) -> None:
    ax.set_xlabel("real training images")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _save(fig, path: Path) -> None:
    plt = _pyplot()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def plot_deltas(comparisons: list[dict], path: Path, metric: str, label: str) -> bool:
    """Δmetric (with vs without added images) vs real size, 95% CI bars, per arm and ratio."""
    grid = _panel_grid(comparisons)
    if grid is None:
        return False
    fig, panels = grid
    for ax, rows, title in panels:
        sizes = sorted({c["real_size"] for c in rows})
        series = sorted({(c["arm"], c["ratio"]) for c in rows})
        span = MIN_DELTA_SPAN
        resolvable = float(np.median([c[metric]["resolvable"] for c in rows]))
        ax.axhspan(-resolvable, resolvable, color="grey", alpha=0.15, label=f"not resolvable (±{resolvable:.3f})")
        for k, (arm, ratio) in enumerate(series):
            sel = sorted((c for c in rows if (c["arm"], c["ratio"]) == (arm, ratio)), key=lambda c: c["real_size"])
            # Sizes as categories, the series side by side: overlapping CIs stay readable.
            x = np.array([sizes.index(c["real_size"]) for c in sel]) + 0.6 * (k - (len(series) - 1) / 2) / len(series)
            y = np.array([c[metric]["delta"] for c in sel])
            low = y - np.array([c[metric]["ci"][0] for c in sel])
            high = np.array([c[metric]["ci"][1] for c in sel]) - y
            added = ", ".join(f"{c['train_synthetic']:.0f}" for c in sel)
            ax.errorbar(x, y, yerr=[low, high], fmt=STYLE.get(arm, "-o"), capsize=3,
                        label=f"{arm} 1:{ratio:g} (added {added})")
            span = max(span, 1.1 * float(np.nanmax(np.abs(np.r_[y - low, y + high]))))
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_ylim(-span, span)
        ax.set_xticks(range(len(sizes)), [str(s) for s in sizes])
        ax.set_xlim(-0.6, len(sizes) - 0.4)
        _label(ax, f"Δ {label} vs real only (95% CI)", title)
    _save(fig, path)
    return True


def plot_auroc(summary: list[dict], path: Path) -> bool:
    """Absolute AUROC (mean ± sd over seeds) vs real size on a fixed 0.5-1 axis."""
    grid = _panel_grid(summary)
    if grid is None:
        return False
    fig, panels = grid
    for ax, rows, title in panels:
        for key in sorted({(r["arm"], r["ratio"], r["synthetic_only"]) for r in rows}):
            sel = sorted((r for r in rows if (r["arm"], r["ratio"], r["synthetic_only"]) == key),
                         key=lambda r: r["real_size"])
            arm, ratio, synthetic_only = key
            name = "synthetic only" if synthetic_only else "real only" if ratio == 0 else f"{arm} 1:{ratio:g}"
            sd = [r["auroc_std"] or 0.0 for r in sel]
            ax.errorbar([r["real_size"] for r in sel], [r["auroc_mean"] for r in sel], yerr=sd, capsize=3,
                        fmt="-o" if ratio == 0 and not synthetic_only else STYLE.get(arm, "-o"), label=name,
                        linewidth=2 if ratio == 0 else 1)
        ax.set_ylim(0.5, 1.0)
        _label(ax, "AUROC (mean ± sd over seeds)", title)
    _save(fig, path)
    return True


def write_plots(out: Path, results: dict) -> list[tuple[str, str]]:
    """The plots of a run: [(path relative to the report folder, caption)]."""
    (out / "plots").mkdir(exist_ok=True)
    plots = []
    against_real = [c for c in results["comparisons"] if c.get("against", REAL_ONLY) == REAL_ONLY]
    for metric in PAIRED_METRICS:
        if plot_deltas(against_real, out / "plots" / f"delta_{metric.key}.png", metric.key, metric.name):
            plots.append((f"plots/delta_{metric.key}.png", f"Δ {metric.name} with vs without added images (paired "
                          "by seed), 95% CI; the grey band is the grid's resolvable difference"))
    if plot_auroc(results["summary"], out / "plots" / "auroc.png"):
        plots.append(("plots/auroc.png", "AUROC vs real training images (mean ± sd over seeds, axis 0.5-1)"))
    return plots
