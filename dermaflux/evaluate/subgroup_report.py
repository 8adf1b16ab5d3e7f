"""The report's subgroup section: its lines, its table and its one plot, from results.json's
`subgroups` (evaluate/subgroups.py). Kept apart from report.py, which renders whatever this returns."""

from __future__ import annotations

from pathlib import Path

from dermaflux.evaluate.data import INTERNAL
from dermaflux.evaluate.plots import MIN_DELTA_SPAN, _pyplot, _save
from dermaflux.evaluate.subgroups import ATTRIBUTE_NAMES, UNKNOWN

PLOT = "plots/subgroups.png"
PLOT_TITLE = "ΔAUROC by subgroup (with vs without added images, 95% CI), largest real size, primary task"


def _f(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _ci(metric: dict) -> str:
    low, high = metric["ci"]
    return f"{metric['delta']:+.3f} [{low:+.3f}, {high:+.3f}]"


def _counts(row: dict) -> str:
    return f"{row['images']} ({', '.join(f'{k} {v}' for k, v in row['per_class'].items())})"


def _added(row: dict) -> str:
    return "none (real only)" if not row["ratio"] else f"1:{row['ratio']:g}"


def subgroup_table(subgroups: dict, task: str) -> list[list[str]]:
    """Rows of the subgroup table for `task`: every subgroup with its counts; metrics only where resolvable."""
    rows = []
    for r in subgroups["rows"]:
        if r["task"] != task:
            continue
        head = [r["model"], r["test_set"], str(r["real_size"]), _added(r), ATTRIBUTE_NAMES[r["attribute"]],
                r["subgroup"], _counts(r)]
        if not r["resolvable"]:
            rows.append(head + [f"not resolvable (< {subgroups['min_per_class']} per class)", "–", "–", "–", "–"])
            continue
        with_, delta = r.get("with"), r.get("auroc")
        rows.append(head + [_f(r["without"]["auroc"]), _f(with_["auroc"]) if with_ else "–",
                            _ci(delta) if delta else "–", _f(r["without"]["balanced_accuracy"]),
                            _ci(r["balanced_accuracy"]) if delta else "–"])
    return rows


SUBGROUP_HEAD = ["model", "test set", "real images", "added", "attribute", "subgroup", "test images (per class)",
                 "AUROC without", "AUROC with", "ΔAUROC [95% CI]", "bal. acc. without", "Δ bal. acc. [95% CI]"]


def subgroup_lines(subgroups: dict | None, task: str) -> list[str]:
    if not subgroups:
        return ["Results by subgroup: not computed."]
    lines = [f"Subgroups with fewer than {subgroups['min_per_class']} test images of some class are counted, not "
             "scored (\"not resolvable\"); CIs are paired bootstraps within class and seeds, unadjusted (descriptive)."]
    for test_set, by_attribute in subgroups["coverage"].items():
        spread = "; ".join(f"{ATTRIBUTE_NAMES[a]}: " + ", ".join(f"{v} {n}" for v, n in values.items())
                           for a, values in by_attribute.items() if a in ("skin_tone", "fitzpatrick", "sex"))
        lines.append(f"Test set {test_set}: {spread}.")
    resolvable = [r for r in subgroups["rows"] if r["task"] == task and r["resolvable"] and r["subgroup"] != UNKNOWN]
    if not resolvable:
        lines.append(f"No subgroup of the {task} task reaches {subgroups['min_per_class']} test images per class: "
                     "this grid cannot resolve a difference between subgroups.")
    for w in subgroups["worst"]:
        if w["task"] != task or w["test_set"] != INTERNAL:
            continue
        change = (f" → {_f(w['with']['auroc'])} with 1:{w['ratio']:g} added (ΔAUROC {_ci(w['auroc'])})"
                  if "with" in w else "")
        lines.append(f"Worst {ATTRIBUTE_NAMES[w['attribute']]} subgroup · {w['model']} · {w['real_size']} real: "
                     f"{w['subgroup']} ({_counts(w)}), AUROC {_f(w['without']['auroc'])}{change}.")
    return lines


def plot_subgroups(subgroups: dict | None, task: str, out: Path) -> str | None:
    """One plot: per resolvable known subgroup of `task` at the largest real size, the ΔAUROC of each
    (model, test set, ratio) with its CI around zero. None when there is nothing to draw."""
    if not subgroups:
        return None
    rows = [r for r in subgroups["rows"] if r["task"] == task and r["resolvable"] and "auroc" in r
            and r["subgroup"] != UNKNOWN]
    if not rows:
        return None
    largest = max(r["real_size"] for r in rows)
    rows = [r for r in rows if r["real_size"] == largest]
    labels = list(dict.fromkeys(f"{ATTRIBUTE_NAMES[r['attribute']]}: {r['subgroup']}" for r in rows))
    series = sorted({(r["model"], r["test_set"], r["ratio"]) for r in rows}, key=lambda s: (s[1] != INTERNAL, s))
    fig, ax = _pyplot().subplots(figsize=(7.5, 0.35 * len(labels) + 1.8))
    for k, (model, test_set, ratio) in enumerate(series):
        mine = [r for r in rows if (r["model"], r["test_set"], r["ratio"]) == (model, test_set, ratio)]
        y = [labels.index(f"{ATTRIBUTE_NAMES[r['attribute']]}: {r['subgroup']}") + 0.15 * k for r in mine]
        x = [r["auroc"]["delta"] for r in mine]
        err = [[d - r["auroc"]["ci"][0] for d, r in zip(x, mine)], [r["auroc"]["ci"][1] - d for d, r in zip(x, mine)]]
        ax.errorbar(x, y, xerr=err, fmt="o", capsize=3, label=f"{model} · {test_set} · 1:{ratio:g}")
    span = max([MIN_DELTA_SPAN] + [abs(v) for r in rows for v in r["auroc"]["ci"]])
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlim(-1.05 * span, 1.05 * span)
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()
    ax.set_xlabel(f"ΔAUROC, {largest} real images")
    ax.set_title("AUROC change by subgroup")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, out / PLOT)
    return PLOT
