"""One self-contained HTML page of a run: params, realised corruption, metrics side by side, figures.

    .venv/bin/python -m dsink.report [--out report.html]      (or: make report)

Figures are embedded as base64 PNGs, so the page can be mailed to a colleague as one file.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from dsink.artifacts import atomic_path, read_corrupted
from dsink.errors import DsinkError

FIGURES = ("per_class", "confusion", "curves", "corrected")
MODELS = (
    ("dsink", "D-SINK student"),
    ("imbalance_teacher", "imbalance teacher f_L"),
    ("noise_teacher", "noise teacher f_N"),
    ("teacher_average", "average of the two teachers"),
    ("ce", "plain cross-entropy"),
    ("la_gce", "GCE on logit-adjusted logits"),
)
COLUMNS = ("top1", "many", "medium", "few", "corrected", "memorised")
VAL_COLUMNS = ("top1", "few")  # the validation split's numbers, what a benchmark chooses on


def _fmt(v: Any) -> str:
    return "&ndash;" if v is None else f"{100 * v:.2f}"


def _metrics_table(metrics: dict[str, Any]) -> str:
    head = "".join(f"<th>{c}</th>" for c in COLUMNS) + "".join(f"<th>val {c}</th>" for c in VAL_COLUMNS)
    rows = []
    for key, label in MODELS:
        if key not in metrics:
            continue
        m = metrics[key]
        val = m.get("val") or {}
        cells = "".join(f"<td>{_fmt(m.get(c))}</td>" for c in COLUMNS)
        cells += "".join(f"<td>{_fmt(val.get(c))}</td>" for c in VAL_COLUMNS)
        rows.append(f"<tr><th>{html.escape(label)}</th>{cells}</tr>")
    return f"<table><tr><th>model (%)</th>{head}</tr>{''.join(rows)}</table>"


def _noise_rate(metrics: dict[str, Any]) -> str:
    nr = metrics.get("noise_rate") or {}
    if not nr:
        return ""
    return (
        f"<p>Noise rate estimated by the noise teacher: {_fmt(nr.get('estimate'))} %; "
        f"realised: {_fmt(nr.get('true'))} %.</p>"
    )


def _histogram(meta: dict[str, Any]) -> str:
    counts = meta.get("class_counts", [])
    noisy = meta.get("noisy_class_counts", [])
    names = meta.get("class_names", [str(i) for i in range(len(counts))])
    top = max(counts + noisy + [1])
    rows = []
    for i, c in enumerate(counts):
        nc = noisy[i] if i < len(noisy) else 0
        rows.append(
            f"<tr><td>{html.escape(str(names[i]))}</td><td>{c}</td><td>{nc}</td>"
            f"<td><div class='bar' style='width:{300 * c / top:.0f}px'></div>"
            f"<div class='bar noisy' style='width:{300 * nc / top:.0f}px'></div></td></tr>"
        )
    return (
        "<table><tr><th>class</th><th>clean count</th><th>noisy-label count</th><th></th></tr>"
        + "".join(rows)
        + "</table>"
    )


def build(params_path: Path, corrupted: Path, metrics: Path, plots: Path) -> str:
    try:
        params = yaml.safe_load(params_path.read_text())
        results = json.loads(metrics.read_text())
    except (OSError, json.JSONDecodeError, yaml.YAMLError) as exc:
        raise DsinkError(
            f"report: cannot read the run's params or metrics ({exc}); run `dvc repro` first"
        ) from exc
    meta = read_corrupted(corrupted).meta
    figs = []
    for name in FIGURES:
        png = plots / f"{name}.png"
        if png.is_file():
            data = base64.b64encode(png.read_bytes()).decode()
            figs.append(
                f"<figure><img alt='{name}' src='data:image/png;base64,{data}'>"
                f"<figcaption>{name}</figcaption></figure>"
            )
    noise = meta.get("noise", {})
    imb = meta.get("imbalance", {})
    summary = (
        f"{meta.get('dataset')}: {sum(meta.get('class_counts', []))} training samples, "
        f"{meta.get('num_classes')} classes, {imb.get('profile')} long tail ratio {imb.get('ratio')}, "
        f"{noise.get('type')} noise at rate {noise.get('rate')} "
        f"(realised {100 * float(meta.get('noise_rate', 0)):.2f}% of labels wrong)"
    )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>dsink report</title>
<style>
body {{ font-family: sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }} td, th {{ border: 1px solid #ccc; padding: 3px 8px; }}
.bar {{ height: 7px; background: #4a7ab5; margin: 1px 0; }} .bar.noisy {{ background: #d98c3f; }}
img {{ max-width: 100%; }} figure {{ display: inline-block; margin: 0.5em; }}
pre {{ background: #f6f6f6; padding: 1em; overflow: auto; }}
</style></head><body>
<h1>D-SINK run report</h1>
<h2>Results (clean, balanced test set; val = the validation split)</h2>
<p>Every model is read in the balanced space (raw logits + train_offset - log training prior).</p>
{_metrics_table(results)}
{_noise_rate(results)}
<h2>Corruption</h2><p>{html.escape(summary)}</p>
{_histogram(meta)}
<h2>Figures</h2>
{"".join(figs) or "<p>No figures found: run the evaluate stage.</p>"}
<h2>Params</h2><pre>{html.escape(yaml.safe_dump(params, sort_keys=False))}</pre>
</body></html>
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--corrupted", default="data/corrupted/train.parquet")
    ap.add_argument("--metrics", default="metrics/evaluate.json")
    ap.add_argument("--plots", default="plots")
    ap.add_argument("--out", default="report.html")
    args = ap.parse_args(argv)
    try:
        page = build(Path(args.params), Path(args.corrupted), Path(args.metrics), Path(args.plots))
    except DsinkError as exc:
        print(f"report: error: {exc}", file=sys.stderr)
        return 2
    with atomic_path(args.out) as tmp:
        tmp.write_text(page)
    print(f"report: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
