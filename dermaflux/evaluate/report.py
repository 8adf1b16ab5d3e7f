"""The report a person opens: report.html and report.md (same tables), plots and image thumbnails
in `plots/` and `images/` beside them (relative paths, so the folder can be moved or zipped)."""

from __future__ import annotations

import html
import io
import math
from pathlib import Path

import numpy as np
from PIL import Image

from dermaflux.core.artifacts import atomic_path, atomic_write_text
from dermaflux.evaluate.data import LABEL_ORDER, ImageTable, read_image_bytes

THUMB = 112
MAX_NEAR_COPIES_SHOWN = 48


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


def summary_table(summary: list[dict]) -> tuple[list[str], list[list[str]]]:
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
    return head, rows


def recall_table(summary: list[dict]) -> tuple[list[str], list[list[str]]]:
    names = []
    for r in summary:
        names += [n for n in r["per_class_recall_mean"] if n not in names]
    head = ["task", "model", "real images", "synthetic 1:x"] + [f"recall {n}" for n in names]
    rows = []
    for r in summary:
        ratio = "synthetic only" if r["synthetic_only"] else f"{r['ratio']:g}"
        rows.append([r["task"], r["model"], str(r["real_size"]), ratio]
                    + [_fmt(r["per_class_recall_mean"].get(n)) for n in names])
    return head, rows


def quality_table(assessment: dict) -> tuple[list[str], list[list[str]]]:
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
    return head, rows


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


# --- rendering -------------------------------------------------------------------------------

def _html_table(head: list[str], rows: list[list[str]], table_id: str) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table id="{table_id}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    esc = lambda s: s.replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(map(esc, head)) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(map(esc, row)) + " |" for row in rows]
    return "\n".join(lines)


CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f0f0f0} td:first-child,td:nth-child(2){text-align:left}
.grid{display:flex;flex-wrap:wrap;gap:6px} figure{margin:0;width:%dpx;font-size:10px}
figure img{width:%dpx;height:%dpx;display:block} .note{background:#fff7e0;padding:.6em;border-left:4px solid #e0a000}
""" % (THUMB, THUMB, THUMB)


def write_report(out: Path, results: dict, grids: dict, pairs: list[dict], plots: list[tuple[str, str]]) -> None:
    summary = results["summary"]
    assessment = results.get("assessment")
    notes = results.get("notes", [])
    h = ['<!doctype html><html><head><meta charset="utf-8"><title>DermaFlux evaluation</title>',
         f"<style>{CSS}</style></head><body>", "<h1>DermaFlux evaluation</h1>"]
    md = ["# DermaFlux evaluation", ""]
    inputs = results["inputs"]
    facts = [f"Corpus: {inputs['corpus']} ({inputs['real_counts']})",
             f"Synthetic set: {inputs.get('synthetic') or 'none'}"
             + (f" ({inputs['synthetic_images']} images)" if inputs.get("synthetic") else ""),
             "All scores are on the real test split; synthetic images only ever join training sets.",
             f"Grid: {len(results['cells'])} cells; metrics are mean ± sample std over seeds."]
    h += ["<ul>"] + [f"<li>{html.escape(f)}</li>" for f in facts] + ["</ul>"]
    md += [f"- {f}" for f in facts] + [""]
    for note in notes:
        h.append(f'<p class="note">{html.escape(note)}</p>')
        md += [f"> {note}", ""]

    head, rows = summary_table(summary)
    h += ["<h2>Classification: real-only vs real + synthetic</h2>", _html_table(head, rows, "summary")]
    md += ["## Classification: real-only vs real + synthetic", "", _md_table(head, rows), ""]
    for src, title in plots:
        h.append(f'<figure style="width:auto"><img class="plot" src="{src}" alt="{html.escape(title)}" style="width:auto;height:auto"><figcaption>{html.escape(title)}</figcaption></figure>')
        md += [f"![{title}]({src})", ""]
    head, rows = recall_table(summary)
    h += ["<h2>Per-class recall (mean over seeds)</h2>", _html_table(head, rows, "recall")]
    md += ["## Per-class recall (mean over seeds)", "", _md_table(head, rows), ""]

    if assessment is not None:
        net = assessment["feature_network"]
        net_text = (f"Feature network: timm {net['model']} ({'pretrained + ' if net['pretrained_weights'] else 'random init, '}"
                    f"trained on the {net['trained_on']}; {net['task']} task, {net['image_size']} px, "
                    f"{net['feature_dim']}-d pre-logit features). Not Inception: FID/KID values compare runs "
                    "of this project only.")
        head, rows = quality_table(assessment)
        h += ["<h2>Synthetic-set quality and memorisation</h2>", f"<p>{html.escape(net_text)}</p>",
              _html_table(head, rows, "quality")]
        md += ["## Synthetic-set quality and memorisation", "", net_text, "", _md_table(head, rows), ""]
        crit = assessment["memorisation"]["criteria"]
        rule = (f"Near-copy: 256-bit pHash within {crit['phash_max_bits']} bits of a train image, or 32 px grey "
                f"pixel correlation ≥ {crit['pixel_corr_min']} with one (every synthetic image's nearest train "
                "image is in memorisation.csv).")
        h += ["<h3>Flagged near-copies</h3>", f"<p>{html.escape(rule)}</p>"]
        md += ["### Flagged near-copies", "", rule, ""]
        if pairs:
            prow = [[p["query_id"], p["pixel_nearest_id"], str(p["phash_distance"]), _fmt(p["pixel_correlation"], 4),
                     _fmt(p.get("feature_cosine_distance"), 4)] for p in pairs]
            phead = ["synthetic image", "nearest train image", "pHash bits", "pixel corr.", "feature cos. dist."]
            h.append(_html_table(phead, prow, "near-copies"))
            md += [_md_table(phead, prow), ""]
            h.append('<div class="grid">')
            for p in pairs:
                for src, cap in ((p["synthetic_src"], f"synthetic {p['query_id']}"), (p["real_src"], f"train {p['pixel_nearest_id']}")):
                    h.append(f'<figure><img src="{src}" alt="{html.escape(cap)}"><figcaption>{html.escape(cap)}</figcaption></figure>')
                    md.append(f"![{cap}]({src})")
            h.append("</div>")
            md.append("")
        else:
            h.append("<p>No synthetic image was flagged.</p>")
            md += ["No synthetic image was flagged.", ""]

    h.append("<h2>Images per class</h2>")
    md += ["## Images per class", ""]
    for label, kinds in grids.items():
        for kind, items in kinds.items():
            if not items:
                continue
            title = f"{label} · {kind} ({'prompt' if kind == 'synthetic' else 'metadata'} below each image)"
            h += [f"<h3>{html.escape(title)}</h3>", '<div class="grid">']
            md += [f"### {title}", ""]
            for item in items:
                h.append(f'<figure><img src="{item["src"]}" alt="{html.escape(item["id"])}">'
                         f"<figcaption>{html.escape(item['caption'])}</figcaption></figure>")
                alt = item["caption"].replace("[", "(").replace("]", ")")
                md.append(f"![{alt}]({item['src']})")
            h.append("</div>")
            md.append("")
    h.append("</body></html>")
    atomic_write_text(out / "report.html", "\n".join(h))
    atomic_write_text(out / "report.md", "\n".join(md) + "\n")
