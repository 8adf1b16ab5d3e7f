"""The caption manifest's skin-tone section: the measured ITA distribution, and where a source also
labels Fitzpatrick types, how the two agree (pure pandas/scipy, no Ray).

ITA and Fitzpatrick measure different things (a colour angle of the imaged skin vs a phototype a
clinician assigns), so agreement is reported as a cross-table and a rank correlation, not a kappa:
darker Fitzpatrick types should come with lower ITA (a negative Spearman rho).
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pandas as pd
from scipy import stats as sps

from dermaflux.lesion.attributes import FITZPATRICK
from dermaflux.lesion.skin_tone import ITA_CATEGORIES

SATURATED_ITA = 89.9  # the skin's median b* was <= 0 (a blue/grey lighting cast): the angle tops out at 90


def _ordered_counts(values) -> dict[str, int]:
    counts = Counter(values)
    return {c: int(counts[c]) for c in ITA_CATEGORIES if counts[c]}


def fitzpatrick_agreement(attrs: list[dict]) -> dict | None:
    """Cross-table Fitzpatrick x ITA category and Spearman rho(Fitzpatrick I..VI, ITA) over rows having both."""
    both = [a for a in attrs if a.get("skin_type") and a.get("ita") is not None]
    if not both:
        return None
    table = {ft: _ordered_counts(a["skin_tone"] for a in both if a["skin_type"] == ft)
             for ft in FITZPATRICK if any(a["skin_type"] == ft for a in both)}
    rank = [FITZPATRICK.index(a["skin_type"]) for a in both]
    ita = [a["ita"] for a in both]
    rho, p = sps.spearmanr(rank, ita) if len(set(rank)) > 1 and len(set(ita)) > 1 else (float("nan"), float("nan"))
    return {"images": len(both), "by_fitzpatrick": table,
            "spearman_rho": None if np.isnan(rho) else round(float(rho), 4),
            "spearman_p": None if np.isnan(p) else float(p)}


def skin_tone_summary(frame: pd.DataFrame) -> dict:
    """From a captioned frame (columns label, source, attributes_json): the ITA distribution overall,
    per label and per source; and per source holding Fitzpatrick labels, their agreement."""
    attrs = [json.loads(a) for a in frame["attributes_json"]]
    measured = [a for a in attrs if a.get("ita") is not None]
    itas = np.array([a["ita"] for a in measured], dtype=float)
    out = {
        "method": "ITA = arctan((L* - 50) / b*) over the skin around the lesion, before white balance",
        "images": len(attrs),
        "measured": len(measured),
        "categories": _ordered_counts(a["skin_tone"] for a in measured),
        "ita_percentiles": ({str(q): round(float(v), 2) for q, v in zip((5, 25, 50, 75, 95),
                                                                         np.percentile(itas, [5, 25, 50, 75, 95]))}
                            if len(itas) else {}),
        "saturated_share": round(float((itas >= SATURATED_ITA).mean()), 4) if len(itas) else None,
        "mean_skin_fraction": round(float(np.mean([a["skin_fraction"] for a in measured])), 4) if measured else None,
        "per_label": {}, "per_source": {}, "fitzpatrick_agreement": {},
    }
    for key, target in (("label", "per_label"), ("source", "per_source")):
        if key not in frame:
            continue
        for value, rows in zip(frame[key], attrs):
            if rows.get("skin_tone"):
                out[target].setdefault(str(value), Counter())[rows["skin_tone"]] += 1
        out[target] = {k: _ordered_counts(v.elements()) for k, v in sorted(out[target].items())}
    sources = frame["source"] if "source" in frame else ["all"] * len(attrs)
    for source in sorted(set(sources)):
        agreement = fitzpatrick_agreement([a for s, a in zip(sources, attrs) if s == source])
        if agreement:
            out["fitzpatrick_agreement"][str(source)] = agreement
    return out
