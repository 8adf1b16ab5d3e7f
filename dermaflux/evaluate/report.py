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
from typing import TYPE_CHECKING

import jinja2
import numpy as np
from PIL import Image

from dermaflux.core.artifacts import atomic_path, atomic_write_text
from dermaflux.evaluate.adherence import ATTRIBUTES as ADHERENCE_ATTRIBUTES
from dermaflux.evaluate.controls import BY_NAME as CONTROL_ARMS
from dermaflux.evaluate.controls import MATCHED
from dermaflux.evaluate.data import LABEL_ORDER, TASK_NAMES, ImageTable, read_image_bytes
from dermaflux.evaluate.metrics import BY_KEY, PAIRED_METRICS, PRIMARY, REPORT_METRICS
from dermaflux.evaluate import subgroup_report
from dermaflux.lesion import taxonomy

if TYPE_CHECKING:
    from dermaflux.config import DermaFluxConfig

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
    """Everything report.html and report.md show, built once from results.json and the thumbnails.
    The order is the reading order: facts, verdicts, controls, adherence, then the tables."""

    facts: list[str]
    verdicts: list[str]
    controls: list[str]
    adherence_lines: list[str]
    notes: list[str]
    comparisons: Table | None
    control_comparisons: Table | None
    summary: Table
    plots: list[Figure]
    recall: Table
    adherence: Table | None
    quality: QualitySection | None
    galleries: list[Gallery]
    subgroup_lines: list[str]  # results by subgroup (evaluate/subgroup_report.py)
    subgroups: Table | None
    subgroup_plot: Figure | None


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _pm(row: dict, metric: str) -> str:
    """mean ± sample sd over seeds; one seed has no spread to estimate (never "± 0.000")."""
    mean, sd = row[f"{metric}_mean"], row[f"{metric}_std"]
    if sd is None:
        return f"{_fmt(mean)} (no spread estimate)" if row["seeds"] == 1 else _fmt(mean)
    return f"{_fmt(mean)} ± {_fmt(sd)}"


def _signed(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:+.{digits}f}"


def _ci(metric: dict) -> str:
    low, high = metric["ci"]
    return f"{_signed(metric['delta'])} [{_signed(low)}, {_signed(high)}]"


def _p(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "–"
    return "< 0.001" if value < 0.001 else f"{value:.3f}"


def arm_label(arm: str, ratio: float, synthetic_only: bool = False) -> str:
    if synthetic_only:
        return "synthetic only"
    if ratio == 0:
        return "real only"
    if arm == "synthetic":
        return f"+ synthetic 1:{ratio:g}"
    control = CONTROL_ARMS[arm]
    return f"+ {control.label} ({control.role}) 1:{ratio:g}"


def added_images(wanted: float, got: float, real: float) -> str:
    """What was really added: count, actual ratio, and the shortfall (never just the ratio asked for)."""
    if not wanted and not got:
        return "0"
    text = f"{got:.0f} (1:{got / max(real, 1):.3g})"
    return text + (f", short by {wanted - got:.0f}" if wanted - got >= 0.5 else "")


def _share(mix: dict[str, float], task: str) -> str:
    if not mix:
        return "–"
    positive = {"mel"} if task == "melanoma" else taxonomy.MALIGNANT_CODES
    return f"{100 * sum(v for k, v in mix.items() if k in positive):.1f}%"


def _test_set(row: dict) -> str:
    left_out = f"; {row['left_out']} without a target left out" if row.get("left_out") else ""
    return f"{row['test_set']} ({row['test_images']} images{left_out})"


def _added(row: dict) -> str:
    text = added_images(row["synthetic_wanted"], row["train_synthetic"], row["train_real"])
    duplicated = row.get("synthetic_duplicated") or 0
    return text + (f", {duplicated:.0f} duplicated real" if duplicated >= 0.5 else "")


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} {n}" for name, n in counts.items())


def summary_table(summary: list[dict], unscorable: list[dict] = ()) -> Table:
    """Every cell group; the metric columns are the metric table's report columns. A test set the
    task cannot score shows its class counts and no figure."""
    counts = {(u["task"], u["test_set"]): u["counts"] for u in unscorable}
    head = ["task", "model", "test set", "real images", "added", "synthetic added (actual ratio)",
            "positive share real / added", "steps", "seeds", *(m.column for m in REPORT_METRICS)]
    rows = []
    for r in summary:
        scorable = r.get("scorable", True)
        test_set = _test_set(r) + ("" if scorable else
                                   f"; not scorable for this task: {_counts(counts[(r['task'], r['test_set'])])}")
        rows.append([
            r["task"], r["model"], test_set, f"{r['train_real']:.0f}",
            arm_label(r["arm"], r["ratio"], r["synthetic_only"]),
            _added(r),
            f"{_share(r['real_class_mix'], r['task'])} / {_share(r['synthetic_class_mix'], r['task'])}",
            ", ".join(str(s) for s in r["optimizer_steps"]), str(r["seeds"]),
            *(_pm(r, m.key) if scorable else "–" for m in REPORT_METRICS),
        ])
    return Table("summary", head, rows)


def comparisons_table(comparisons: list[dict], table_id: str) -> Table:
    """The paired comparisons; a pair of columns (Δ with CI, adjusted p) per paired metric."""
    head = ["task", "model", "test set", "real images", "added", "synthetic added (actual ratio)", "against",
            "seeds", *(h for m in PAIRED_METRICS for h in (f"Δ{m.column} [95% CI]", "p (adj.)")),
            f"resolvable Δ{BY_KEY[PRIMARY].column}"]
    rows = [[c["task"], c["model"], f"{c['test_set']} ({c['test_images']})", str(c["real_size"]),
             arm_label(c["arm"], c["ratio"]), _added(c), _against(c), str(len(c["seeds"])),
             *(cell for m in PAIRED_METRICS for cell in (_ci(c[m.key]), _p(c[m.key]["p_adjusted"]))),
             f"±{_fmt(c[PRIMARY]['resolvable'])}"] for c in comparisons]
    return Table(table_id, head, rows)


def _against(c: dict) -> str:
    return "matched real (same class mix)" if c.get("against") == MATCHED else "real only"


def recall_table(summary: list[dict]) -> Table:
    names = []
    for r in summary:
        names += [n for n in r["per_class_recall_mean"] if n not in names]
    head = ["task", "model", "test set", "real images", "added"] + [f"recall {n}" for n in names]
    rows = []
    for r in summary:
        rows.append([r["task"], r["model"], r["test_set"], f"{r['train_real']:.0f}",
                     arm_label(r["arm"], r["ratio"], r["synthetic_only"])]
                    + [_fmt(r["per_class_recall_mean"].get(n)) for n in names])
    return Table("recall", head, rows)


def adherence_table(adherence: dict) -> Table:
    head = ["attribute", "measured by", "images", "agreement", "chance agreement", "Cohen's kappa [95% CI]",
            "not measurable"]
    rows = []
    for name in ADHERENCE_ATTRIBUTES:
        a = adherence["attributes"][name]
        if not a["n"] and not a["not_measured"]:
            rows.append([name.replace("_", " "), a["measured_by"], "0 (not requested by this set)", "–", "–", "–",
                         "0"])
            continue
        ci = a.get("kappa_ci") or [None, None]
        kappa = f"{_signed(a['kappa'], 2)} [{_signed(ci[0], 2)}, {_signed(ci[1], 2)}]" if a["n"] else "–"
        unit = f" ({a['n']} image x colour pairs)" if name == "colours" and a["n"] else ""
        rows.append([name.replace("_", " "), a["measured_by"], f"{a['images']}{unit}", _fmt(a["agreement"]),
                     _fmt(a["chance"]), kappa, str(a["not_measured"])])
    return Table("adherence", head, rows)

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
    known = set(real.labels.tolist()) | (set(synthetic.labels.tolist()) if synthetic is not None else set())
    labels = sorted(known - {None}, key=lambda c: (LABEL_ORDER.index(c) if c in LABEL_ORDER else 99, c))
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


def generator_nature(manifest: dict) -> str:
    """What made the synthetic images, in words, from the set's manifest and its adapter's meta."""
    if not manifest:
        return "none: no synthetic set (real-only grid and controls only)"
    if manifest.get("stand_in"):
        return f"stand-in, not generated by Flux ({manifest.get('generator') or 'perturbed real images'})"
    model = manifest.get("model") or "unknown model"
    base = ("the tiny Flux built locally (random base weights, CPU demo scale; not FLUX.1)"
            if model == "builtin:tiny" else model)
    return f"{base}; {_adapter_words(manifest)}"


def _adapter_words(manifest: dict) -> str:
    path = manifest.get("adapter_path")
    if not path:
        return "no adapter (the base model as it is)"
    from dermaflux.model.adapters import read_adapter

    try:
        info = read_adapter(path)
    except (FileNotFoundError, ValueError, KeyError) as err:
        return f"adapter {manifest.get('adapter')!r} (its folder cannot be read now: {err})"
    meta = info.meta or {}
    if "random_seed" in meta:
        return f"a random, untrained {info.kind} adapter (seed {meta['random_seed']})"
    trained = f"trained {meta['step']} steps" if "step" in meta else "training steps not recorded"
    return f"{info.kind} adapter {manifest.get('adapter')!r} ({trained}{', fitted VAE' if info.has_vae else ''})"


def run_facts(cfg: DermaFluxConfig, manifest: dict, cells: list[dict], synthetic_images: int) -> dict:
    """The facts the report states first: preset and scale, classifier training, the generator."""
    ev = cfg.evaluate
    pretrained = sorted({c["training"].get("pretrained") for c in cells})
    training = (f"{ev.steps} optimiser steps per cell, the same for every cell (batch {ev.batch_size}); the best of "
                f"{ev.validations} validation checks by val AUROC is kept" if ev.steps else
                f"{ev.epochs} epochs per cell (batch {ev.batch_size}, early stopping): compute grows with the "
                "training set, so added images also add steps")
    settings = manifest.get("settings") or {}
    images = (f"{settings.get('width')}x{settings.get('height')} px, {settings.get('num_inference_steps')} sampling "
              f"steps, guidance {settings.get('guidance_scale')}" if settings else "–")
    return {
        "preset": cfg.preset,
        "classifier": f"{', '.join(ev.models)} at {ev.image_size} px, {training}; pretrained weights: "
                      f"{'/'.join('yes' if p else 'no' for p in pretrained) or '–'}",
        "generator": generator_nature(manifest),
        "synthetic_images": f"{synthetic_images} images ({images})" if synthetic_images else "none",
        "task": f"{ev.main_task} ({TASK_NAMES[ev.main_task]})",
        "statistics": f"paired by seed (same real subset and initialisation with and without added images); "
                      f"paired bootstrap over test images (within class) and seeds, {ev.bootstrap} resamples; "
                      f"DeLong for two-class AUROC; {ev.adjustment} adjustment across the grid (the synthetic set "
                      "against real only, the synthetic set against the matched control, and the controls as "
                      f"separate families); resolvable difference at alpha {ev.alpha}, power {ev.power}",
        "controls": _controls_method(ev.controls, bool(synthetic_images)),
        "scoring": f"a test set scores a task only when at least two of its classes have {ev.min_test_per_class} or "
                   "more images; otherwise it is reported as not scorable for that task, with its class counts, and "
                   "gets no metric, Δ, p-value or verdict (e.g. a melanoma-only external set under the binary task)",
    }


def _controls_method(controls: bool, has_synthetic: bool) -> str:
    """The methods sentence on the controls (what each one adds, and what it is for)."""
    if not controls:
        return "none (evaluate.controls is off: the grid's power to see an effect is not shown)"
    matched = ("matched real (positive control at the synthetic set's class mix): real-extra images drawn to the "
               "class counts the synthetic set gives the same seed, size and ratio, so a synthetic gain that only "
               "comes from more positive examples is matched; where a class's real images run out they are used "
               "again (duplicated real, counted in the tables: the class mix without new images); the synthetic "
               "set's verdict is also stated against it" if has_synthetic else
               "no matched control (it copies a synthetic set's class mix, and there is none)")
    return ("real-extra (positive control): real train images outside the cell's subset, added at the real subset's "
            "class mix, must help; shuffled (negative control): the same images with permuted labels, must not; "
            + matched)


def _facts(results: dict) -> list[str]:
    inputs, facts = results["inputs"], results["facts"]
    test_sets = ", ".join(f"{name} ({n} images)" for name, n in inputs["test_sets"].items())
    lines = [
        f"Preset: {facts['preset']}. Classifier: {facts['classifier']}.",
        f"Generator: {facts['generator']}. Synthetic set: {facts['synthetic_images']}.",
        f"Primary task: {facts['task']}; AUROC is the primary metric; balanced accuracy, sensitivity and specificity "
        "at the threshold chosen on the validation split (two-class tasks).",
        f"Test sets (each scored on its own): {test_sets}. Synthetic images only ever join training sets.",
        f"Statistics: {facts['statistics']}.",
        f"Controls: {facts['controls']}.",
        f"Scoring: {facts['scoring']}.",
        f"Inputs, relative to {inputs['paths_relative_to']}: corpus {inputs['corpus']}, synthetic set "
        f"{inputs['synthetic'] or 'none'}.",
    ]
    if inputs["without_diagnosis"]:
        lines.append(f"{inputs['without_diagnosis']} test rows have no diagnosis: scored by the binary task(s) their "
                     "source labels, left out of multiclass scoring.")
    return lines


def _ratio_parts(members: list[dict]) -> str:
    name = BY_KEY[PRIMARY].column
    return "; ".join(f"1:{c['ratio']:g} (added {_added(c)}): Δ{name} {_ci(c[PRIMARY])}, "
                     f"adj. p {_p(c[PRIMARY]['p_adjusted'])}" for c in members)


def _verdict_line(v: dict, alpha: float) -> str:
    name = BY_KEY[PRIMARY].column
    versus = ""
    if v.get("versus_matched"):
        versus = (f" Against matched real images at the same class mix: {v['versus_matched'].upper()} — "
                  f"{_ratio_parts(v['versus_matched_by_ratio'])}.")
    return (f"{v['task']} · {v['model']} · {v['test_set']} · {v['real_size']} real images: "
            f"{v['verdict'].upper()} — {_ratio_parts(v['by_ratio'])}. Smallest resolvable Δ{name} ≈ "
            f"±{_fmt(v['resolvable'])} (alpha {alpha}).{versus}")


def _control_line(c: dict) -> str:
    a, control = c["auroc"], CONTROL_ARMS[c["arm"]]
    seen = {1: "gain detected", -1: "loss detected", 0: "no effect detected"}[c["detected"]]
    check = ("as expected" if c["as_expected"] else "NOT as expected: at this size and seed count the grid cannot "
             "see a real-image gain, so read its 'no detectable effect' as 'not measurable here'"
             if control.expected else "NOT as expected: a gain from wrong labels is a false positive; "
             "distrust the synthetic set's gains at this size")
    duplicated = c.get("synthetic_duplicated") or 0
    dup = f" ({duplicated:.0f} of the added images duplicated real)" if duplicated >= 0.5 else ""
    return (f"{control.words} · {c['task']} · {c['model']} · {c['test_set']} · {c['real_size']} real + "
            f"1:{c['ratio']:g}{dup}: ΔAUROC {_ci(a)}, adj. p {_p(a['p_adjusted'])} — {seen}, {check}.")


def not_scorable_note(unscorable: list[dict]) -> str | None:
    """The one line that names every test set/task pair left unscored, with its counts."""
    if not unscorable:
        return None
    pairs = "; ".join(f"{u['test_set']} under the {u['task']} task ({_counts(u['counts'])}"
                      + (f"; {u['left_out']} rows without a target for it" if u["left_out"] else "") + ")"
                      for u in unscorable)
    return (f"Not scorable for this task: {pairs}. A task needs at least two classes with "
            f"{unscorable[0]['min_per_class']} or more test images each, so these pairs get no metric, Δ, p-value "
            "or verdict.")


def _adherence_lines(adherence: dict | None) -> list[str]:
    if not adherence:
        return ["Attribute adherence: not measured (no synthetic set, or evaluate.adherence is off)."]
    attrs = adherence["attributes"]
    parts = []
    for name in ADHERENCE_ATTRIBUTES:
        a = attrs[name]
        if a["n"]:
            parts.append(f"{name.replace('_', ' ')} κ {_signed(a['kappa'], 2)} (agreement {_fmt(a['agreement'], 2)} "
                         f"vs chance {_fmt(a['chance'], 2)}, n {a['images']})")
    by_tone = [f"{tone.replace('_', ' ')} skin: diagnosis {_fmt(t['diagnosis_agreement'], 2)}, malignancy "
               f"{_fmt(t['malignancy_agreement'], 2)} (n {t['images']})"
               for tone, t in adherence.get("by_skin_tone", {}).items()]
    return [f"Attribute adherence of {adherence['images']} of {adherence['of']} synthetic images (κ 0 = chance, "
            f"1 = always as requested): " + ("; ".join(parts) or "no attribute could be compared") + "."] + (
        [f"Agreement by requested skin tone: {'; '.join(by_tone)}."] if by_tone else [])


def report_data(results: dict, grids: dict, pairs: list[dict], plots: list[tuple[str, str]]) -> ReportData:
    assessment, alpha = results.get("assessment"), results["settings"]["alpha"]
    comparisons = results["comparisons"]
    study = [c for c in comparisons if c["arm"] == "synthetic"]
    control = [c for c in comparisons if c["arm"] != "synthetic"]
    verdicts = [_verdict_line(v, alpha) for v in results["verdicts"]] or [
        "No synthetic set was compared (real-only grid): no verdict."]
    return ReportData(
        facts=_facts(results),
        verdicts=verdicts,
        controls=[_control_line(c) for c in results["control_checks"]],
        adherence_lines=_adherence_lines(results.get("adherence")),
        notes=[*filter(None, [not_scorable_note(results.get("not_scorable", []))]), *results.get("notes", [])],
        comparisons=comparisons_table(study, "comparisons") if study else None,
        control_comparisons=comparisons_table(control, "controls") if control else None,
        summary=summary_table(results["summary"], results.get("not_scorable", [])),
        plots=[Figure(src, title, title) for src, title in plots],
        recall=recall_table(results["summary"]),
        adherence=adherence_table(results["adherence"]) if results.get("adherence") else None,
        quality=_quality_section(assessment, pairs) if assessment is not None else None,
        galleries=_galleries(grids),
        **_subgroup_section(results),
    )


def _subgroup_section(results: dict) -> dict:
    found, task = results.get("subgroups"), results["primary_task"]
    rows = subgroup_report.subgroup_table(found, task) if found else []
    plot = found.get("plot") if found else None
    return {"subgroup_lines": subgroup_report.subgroup_lines(found, task),
            "subgroups": Table("subgroups", subgroup_report.SUBGROUP_HEAD, rows) if rows else None,
            "subgroup_plot": Figure(plot, subgroup_report.PLOT_TITLE, subgroup_report.PLOT_TITLE) if plot else None}


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
