"""The report a person opens: report.html and report.md, plots and image thumbnails in `plots/` and
`images/` beside them (relative paths, so the folder can be moved or zipped).

Both files are rendered from one `ReportData` by the Jinja2 templates in `templates/`, so they
hold the same sections, tables and images."""

from __future__ import annotations

import functools
import io
import math
from dataclasses import dataclass
from pathlib import Path

import jinja2
import numpy as np
from PIL import Image

from dermaflux.core.artifacts import atomic_path, atomic_write_text
from dermaflux.evaluate.data import LABEL_ORDER, ImageTable, read_image_bytes

THUMB = 112
MAX_NEAR_COPIES_SHOWN = 48


@dataclass
class Table:
    id: str  # the HTML table id (the render test finds tables by it)
    head: list[str]
    rows: list[list[str]]


@dataclass
class Figure:
    src: str  # relative to the report folder
    alt: str
    caption: str


@dataclass
class Gallery:
    title: str
    figures: list[Figure]


@dataclass
class QualitySection:
    feature_network: str
    table: Table
    near_copy_rule: str
    near_copies: Table | None  # None: nothing was flagged
    near_copy_figures: list[Figure]


@dataclass
class ReportData:
    """Everything report.html and report.md show, built once from results.json and the thumbnails."""

    facts: list[str]
    notes: list[str]
    summary: Table
    plots: list[Figure]
    recall: Table
    quality: QualitySection | None
    galleries: list[Gallery]


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _pm(row: dict, metric: str) -> str:
    return f"{_fmt(row[f'{metric}_mean'])} ± {_fmt(row[f'{metric}_std'])}"


def _signed(value: float) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:+.3f}"


def summary_table(summary: list[dict]) -> Table:
    head = ["task", "model", "real images", "synthetic 1:x", "train real+syn", "seeds", "accuracy",
            "balanced acc.", "macro-F1", "macro AUROC", "Δ bal. acc. vs real-only", "Δ AUROC vs real-only"]
    rows = []
    for r in summary:
        ratio = "synthetic only" if r["synthetic_only"] else f"{r['ratio']:g}"
        rows.append([
            r["task"], r["model"], str(r["real_size"]), ratio, f"{r['train_real']}+{r['train_synthetic']}",
            str(r["seeds"]), _pm(r, "accuracy"), _pm(r, "balanced_accuracy"), _pm(r, "macro_f1"),
            _pm(r, "macro_auroc"), _signed(r["balanced_accuracy_gain"]), _signed(r["macro_auroc_gain"]),
        ])
    return Table("summary", head, rows)


def recall_table(summary: list[dict]) -> Table:
    names = []
    for r in summary:
        names += [n for n in r["per_class_recall_mean"] if n not in names]
    head = ["task", "model", "real images", "synthetic 1:x"] + [f"recall {n}" for n in names]
    rows = []
    for r in summary:
        ratio = "synthetic only" if r["synthetic_only"] else f"{r['ratio']:g}"
        rows.append([r["task"], r["model"], str(r["real_size"]), ratio]
                    + [_fmt(r["per_class_recall_mean"].get(n)) for n in names])
    return Table("recall", head, rows)


def quality_table(assessment: dict) -> Table:
    mem = assessment["memorisation"]
    head = ["measure", "synthetic vs real test", "reference: real val vs real test"]
    rows = [
        ["FID", _fmt(assessment["fid"], 2), _fmt(assessment["fid_real_val_vs_test"], 2)],
        ["KID", f"{_fmt(assessment['kid_mean'], 4)} ± {_fmt(assessment['kid_std'], 4)}",
         _fmt(assessment["kid_real_val_vs_test"], 4)],
        [f"precision (k={assessment['k']})", _fmt(assessment["precision"]), "–"],
        [f"recall (k={assessment['k']})", _fmt(assessment["recall"]), "–"],
        ["near-copies of train images", f"{mem['flagged_count']} of {mem['checked']}",
         f"{mem['control_real_val_flagged']} of {mem['control_real_val_checked']} (false alarms)"],
        ["median nearest pHash distance (bits)", _fmt(mem["median_phash_distance"], 1),
         _fmt(mem["control_median_phash_distance"], 1)],
        ["median nearest feature cosine distance", _fmt(mem["median_feature_cosine_distance"], 4),
         _fmt(mem["control_median_feature_cosine_distance"], 4)],
    ]
    return Table("quality", head, rows)


def plot_accuracy(summary: list[dict], path: Path, metric: str, label: str) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["task"], r["model"]) for r in summary})
    if not groups:
        return False
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4), squeeze=False)
    for ax, (task, model) in zip(axes[0], groups):
        rows = [r for r in summary if r["task"] == task and r["model"] == model]
        series = sorted({("synthetic only" if r["synthetic_only"] else r["ratio"]) for r in rows}, key=str)
        for key in series:
            sel = sorted((r for r in rows if ("synthetic only" if r["synthetic_only"] else r["ratio"]) == key),
                         key=lambda r: r["real_size"])
            x = [r["real_size"] for r in sel]
            y = np.array([r[f"{metric}_mean"] for r in sel])
            e = np.array([r[f"{metric}_std"] for r in sel])
            name = "real only" if key == 0 else ("synthetic only" if key == "synthetic only" else f"real + synthetic 1:{key:g}")
            style = "--" if key == "synthetic only" else ("-o" if key == 0 else "-s")
            ax.errorbar(x, y, yerr=e, fmt=style, capsize=3, label=name, linewidth=2 if key == 0 else 1)
        ax.set_xlabel("real training images")
        ax.set_ylabel(f"{label} (real test split)")
        ax.set_title(f"{task} · {model}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return True


def _save_thumb(data: bytes, path: Path) -> None:
    img = Image.open(io.BytesIO(data)).convert("RGB").resize((THUMB, THUMB), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def image_grids(out: Path, corpus: Path, synthetic_dir: Path | None, real: ImageTable,
                synthetic: ImageTable | None, per_class: int, seed: int = 0) -> dict[str, dict[str, list[dict]]]:
    """{label: {"real": [...], "synthetic": [...]}}; each item {src, caption, id}, thumbnails written."""
    rng = np.random.default_rng(seed)
    labels = sorted(set(real.labels.tolist()) | (set(synthetic.labels.tolist()) if synthetic is not None else set()),
                    key=lambda c: (LABEL_ORDER.index(c) if c in LABEL_ORDER else 99, c))
    chosen: dict[str, dict[str, list[int]]] = {}
    train = np.flatnonzero(real.split == "train")
    for label in labels:
        pool = train[real.labels[train] == label]
        entry = {"real": rng.choice(pool, size=min(per_class, len(pool)), replace=False).tolist()}
        if synthetic is not None:
            spool = np.flatnonzero(synthetic.labels == label)
            entry["synthetic"] = rng.choice(spool, size=min(per_class, len(spool)), replace=False).tolist()
        chosen[label] = entry
    real_bytes = read_image_bytes(corpus, {real.ids[i] for e in chosen.values() for i in e["real"]})
    syn_bytes = (read_image_bytes(synthetic_dir, {synthetic.ids[i] for e in chosen.values() for i in e.get("synthetic", [])})
                 if synthetic is not None else {})
    grids: dict[str, dict[str, list[dict]]] = {}
    for label, entry in chosen.items():
        grids[label] = {}
        for kind, table, blobs in (("real", real, real_bytes), ("synthetic", synthetic, syn_bytes)):
            items = []
            for i in entry.get(kind, []):
                rid = str(table.ids[i])
                src = f"images/{kind}/{_safe(rid)}.png"
                _save_thumb(blobs[rid], out / src)
                items.append({"src": src, "caption": table.captions[i], "id": rid})
            grids[label][kind] = items
    return grids


def near_copy_pairs(out: Path, corpus: Path, synthetic_dir: Path, assessment: dict) -> list[dict]:
    flagged = assessment["memorisation"]["flagged"][:MAX_NEAR_COPIES_SHOWN]
    syn_bytes = read_image_bytes(synthetic_dir, {f["query_id"] for f in flagged})
    real_bytes = read_image_bytes(corpus, {f["pixel_nearest_id"] for f in flagged})
    pairs = []
    for f in flagged:
        syn_src = f"images/near_copies/{_safe(f['query_id'])}.png"
        real_src = f"images/near_copies/{_safe(f['pixel_nearest_id'])}.png"
        _save_thumb(syn_bytes[f["query_id"]], out / syn_src)
        _save_thumb(real_bytes[f["pixel_nearest_id"]], out / real_src)
        pairs.append({**f, "synthetic_src": syn_src, "real_src": real_src})
    return pairs


# --- building the ReportData, then rendering it -----------------------------------------------

def _facts(results: dict) -> list[str]:
    inputs = results["inputs"]
    synthetic = (f"Synthetic set: {inputs['synthetic']} ({inputs['synthetic_images']} images)"
                 if inputs.get("synthetic") else "Synthetic set: none")
    return [f"Corpus: {inputs['corpus']} ({inputs['real_counts']})", synthetic,
            "All scores are on the real test split; synthetic images only ever join training sets.",
            f"Grid: {len(results['cells'])} cells; metrics are mean ± sample std over seeds."]


def _quality_section(assessment: dict, pairs: list[dict]) -> QualitySection:
    net = assessment["feature_network"]
    network = (f"Feature network: timm {net['model']} ({'pretrained + ' if net['pretrained_weights'] else 'random init, '}"
               f"trained on the {net['trained_on']}; {net['task']} task, {net['image_size']} px, "
               f"{net['feature_dim']}-d pre-logit features). Not Inception: FID/KID values compare runs "
               "of this project only.")
    crit = assessment["memorisation"]["criteria"]
    rule = (f"Near-copy: 256-bit pHash within {crit['phash_max_bits']} bits of a train image, or 32 px grey "
            f"pixel correlation ≥ {crit['pixel_corr_min']} with one (every synthetic image's nearest train "
            "image is in memorisation.csv).")
    near_copies = Table(
        "near-copies", ["synthetic image", "nearest train image", "pHash bits", "pixel corr.", "feature cos. dist."],
        [[p["query_id"], p["pixel_nearest_id"], str(p["phash_distance"]), _fmt(p["pixel_correlation"], 4),
          _fmt(p.get("feature_cosine_distance"), 4)] for p in pairs],
    ) if pairs else None
    figures = []
    for p in pairs:
        for src, caption in ((p["synthetic_src"], f"synthetic {p['query_id']}"),
                             (p["real_src"], f"train {p['pixel_nearest_id']}")):
            figures.append(Figure(src, caption, caption))
    return QualitySection(network, quality_table(assessment), rule, near_copies, figures)


def _galleries(grids: dict) -> list[Gallery]:
    galleries = []
    for label, kinds in grids.items():
        for kind, items in kinds.items():
            if items:
                title = f"{label} · {kind} ({'prompt' if kind == 'synthetic' else 'metadata'} below each image)"
                galleries.append(Gallery(title, [Figure(i["src"], i["id"], i["caption"]) for i in items]))
    return galleries


def report_data(results: dict, grids: dict, pairs: list[dict], plots: list[tuple[str, str]]) -> ReportData:
    assessment = results.get("assessment")
    return ReportData(
        facts=_facts(results),
        notes=list(results.get("notes", [])),
        summary=summary_table(results["summary"]),
        plots=[Figure(src, title, title) for src, title in plots],
        recall=recall_table(results["summary"]),
        quality=_quality_section(assessment, pairs) if assessment is not None else None,
        galleries=_galleries(grids),
    )


def _markdown_cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def _markdown_alt(text: str) -> str:
    # A bracket in alt text would end the image link early.
    return str(text).replace("[", "(").replace("]", ")")


@functools.cache
def _templates() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("dermaflux.evaluate", "templates"),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html.j2",), default_for_string=False),
        undefined=jinja2.StrictUndefined,  # a misspelt field fails the render instead of printing nothing
        trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
    )
    env.filters.update(md_cell=_markdown_cell, md_alt=_markdown_alt)
    return env


def write_report(out: Path, results: dict, grids: dict, pairs: list[dict], plots: list[tuple[str, str]]) -> None:
    data = report_data(results, grids, pairs, plots)
    for name in ("report.html", "report.md"):
        text = _templates().get_template(f"{name}.j2").render(report=data, thumb=THUMB)
        atomic_write_text(out / name, text)
