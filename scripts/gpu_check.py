"""Helpers of scripts/gpu-check.sh (plain Python, no project imports beyond the config):

    python scripts/gpu_check.py slim-ray-wheel DIR    # here: ray's wheel in DIR without what GPU runs never load
    python scripts/gpu_check.py report RESULTS        # there (or here, on the files a call brought back):
                                                      # RESULTS/h200-product.json from the step outputs
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Java workers' jars (32 MB), the dashboard's web client (2.5 MB) and RLlib: nothing the GPU check imports.
RAY_DROPPED = ("ray/jars/", "ray/dashboard/client/build/", "ray/rllib/")


def slim_ray_wheel(folder: Path) -> None:
    """Rewrite ray-*.whl in `folder` without RAY_DROPPED, its RECORD listing only what stays."""
    for wheel in sorted(folder.glob("ray-*.whl")):
        slim = wheel.with_suffix(".slim")
        with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
            for item in src.infolist():
                if item.filename.startswith(RAY_DROPPED):
                    continue
                data = src.read(item)
                if item.filename.endswith(".dist-info/RECORD"):
                    kept = [line for line in data.decode().splitlines() if not line.startswith(RAY_DROPPED)]
                    data = ("\n".join(kept) + "\n").encode()
                dst.writestr(item, data)
        before, after = wheel.stat().st_size, slim.stat().st_size
        slim.replace(wheel)
        print(f"{wheel.name}: {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB")


def _tests(results: Path) -> dict:
    """Outcomes over every gpu-tests-*.xml (calls in time order; a later run of a test replaces an earlier)."""
    outcome: dict[str, str] = {}
    for path in sorted(results.glob("gpu-tests*.xml")):
        for case in ET.parse(path).getroot().iter("testcase"):
            failed = case.find("failure") is not None or case.find("error") is not None
            outcome[case.get("name")] = "failed" if failed else "skipped" if case.find("skipped") is not None else "passed"
    if not outcome:
        return {"passed": 0, "failed": None, "note": "no gpu-tests-*.xml (the tests step did not run)"}
    names = {state: sorted(n for n, s in outcome.items() if s == state) for state in ("passed", "failed", "skipped")}
    return {"passed": len(names["passed"]), "failed": len(names["failed"]), "skipped": len(names["skipped"]),
            "failed_names": names["failed"]}


def _records(results: Path) -> dict[str, dict]:
    path = results / "gpu-results.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return {rec["section"]: rec for rec in map(json.loads, filter(None, lines))}


def report(results: Path) -> Path:
    """The keys issue 11 asks for; None where a step did not produce its figure."""
    import torch

    bench = json.loads((results / "bench-train.json").read_text()) if (results / "bench-train.json").exists() else {}
    product = bench.get("product", {})
    records = _records(results)
    serve, generate = records.get("serve", {}), records.get("generate", {})
    steps = [line.split("\t") for line in (results / "steps.tsv").read_text().splitlines()] \
        if (results / "steps.tsv").exists() else []
    sys.path.insert(0, str(ROOT))
    from dermaflux.config import load_config

    out = {
        "date": datetime.date.today().isoformat(), "commit": os.environ.get("DFX_COMMIT", "unknown"),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else bench.get("device"),
        "torch": bench.get("torch", torch.__version__),
        "gpu_tests": _tests(results),
        "train": {"samples_per_s": product.get("samples_per_s"),
                  "reference_samples_per_s": bench.get("reference_samples_per_s"),
                  "plain_same_settings_samples_per_s": bench.get("plain_same_settings_samples_per_s"),
                  "mfu": bench.get("mfu"), "peak_gib": product.get("peak_gib"),
                  **{k: product.get(k) for k in ("micro_batch", "gradient_checkpointing", "text_tokens", "compiled")}},
        "serve": {"s_per_image": serve.get("s_per_image_http"),
                  "reference_s_per_image": records.get("serve_reference", {}).get("s_per_image"),
                  "batch": load_config("flux-dev").synth.batch_size},
        "generate": {"s_per_image": generate.get("s_per_image_with_startup"), "images": generate.get("images")},
        "steps": [{"step": name, "exit_code": int(rc), "seconds": int(sec)} for name, rc, sec in steps],
        "details": {"bench_train": bench, "gpu_records": records},
    }
    path = results / "h200-product.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "details"}, indent=2))
    return path


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("slim-ray-wheel", "report"):
        print(__doc__, file=sys.stderr)
        return 2
    if argv[0] == "slim-ray-wheel":
        slim_ray_wheel(Path(argv[1]))
    else:
        report(Path(argv[1]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
