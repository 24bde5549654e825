"""One self-contained HTML page of a run: metrics side by side, realised corruption, figures, label issues.

    .venv/bin/python -m dsink.report [--out report.html]      (or: make report)

Figures and image thumbnails are embedded as base64 PNGs, so the page can be mailed as one file.

The label-issues section reads the `label_issues` stage's outputs (data/label_issues.parquet and
metrics/label_issues.json; `dvc repro label_issues` makes them, the page builds without them): how many
training labels the transport plan flags, precision / recall / F1 / AUROC against the injected noise when
the corrupted set knows it (overall and per many / medium / few group), the precision-recall curve of
issue_score with the stage's rule marked, and the --per-class most suspected training images of every
class (grouped by given label, highest issue_score first) with given label, suggested label and score.
Thumbnails need the source dataset (params.yaml's data section); without it the page says so.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from dsink.artifacts import CorruptedIndex, atomic_path, read_corrupted
from dsink.errors import DsinkError

FIGURES = (  # file stem in plots/, caption
    ("per_class", "Per-class test accuracy against training class size"),
    ("confusion", "Confusion matrix of the D-SINK student (test set, rows normalised)"),
    ("curves", "Training curves: test top-1 and training loss per epoch"),
    ("corrected", "Noisy training labels corrected / memorised per epoch"),
)
ISSUE_COLUMNS = ("sample_id", "given_label", "suggested_label", "issue_score", "is_issue")
ISSUE_GROUPS = (
    ("overall", "all classes"),
    ("many", "many-shot"),
    ("medium", "medium-shot"),
    ("few", "few-shot"),
)
THUMB_TARGET = 96  # thumbnails are upscaled (nearest neighbour) to about this many pixels a side
THUMB_MAX = 128  # and larger images scaled down to fit
MODELS = (
    ("dsink", "D-SINK student"),
    ("imbalance_teacher", "imbalance teacher f_L"),
    ("noise_teacher", "noise teacher f_N"),
    ("teacher_average", "average of the two teachers"),
    ("ce", "plain cross-entropy"),
    ("la_small_loss", "LA + small-loss (one model)"),
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
    legend = (
        "<p class='legend'><span class='swatch'></span> clean count: training images whose true class it is"
        " &nbsp; <span class='swatch noisy'></span> noisy-label count: training images labelled with it"
        " after the noise</p>"
    )
    return (
        legend
        + "<table><tr><th>class</th><th>clean count</th><th>noisy-label count</th><th></th></tr>"
        + "".join(rows)
        + "</table>"
    )


def _figures(plots: Path) -> str:
    figs = []
    for stem, caption in FIGURES:
        png = plots / f"{stem}.png"
        if png.is_file():
            data = base64.b64encode(png.read_bytes()).decode()
            figs.append(
                f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{data}'>"
                f"<figcaption>{html.escape(caption)}</figcaption></figure>"
            )
    return (
        "".join(figs) or "<p>No figures found: run the evaluate stage (<code>dvc repro evaluate</code>).</p>"
    )


# ------------------------------------------------------------------------------------ label issues


def precision_recall_curve(score: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision and recall of flagging ``score >= t`` for the positives ``truth``, at every distinct score.

    Returns ``(precision, recall, thresholds)`` in order of decreasing threshold (recall rising), one point
    per distinct score: the samples are sorted by score, true and false positives counted cumulatively, and
    the count read at the last sample of each run of equal scores (tied samples are flagged together).
    """
    score = np.asarray(score, dtype=np.float64)
    truth = np.asarray(truth, dtype=bool)
    if score.shape != truth.shape or score.ndim != 1:
        raise ValueError(f"score {score.shape} and truth {truth.shape} must be equal-length vectors")
    if score.size == 0 or not truth.any():
        raise ValueError("a precision-recall curve needs at least one positive")
    order = np.argsort(-score, kind="stable")
    s, t = score[order], truth[order]
    last = np.r_[np.flatnonzero(s[1:] != s[:-1]), s.size - 1]  # last index of each run of equal scores
    tp = np.cumsum(t)[last]
    flagged = last + 1
    return tp / flagged, tp / tp[-1], s[last]


def average_precision(precision: np.ndarray, recall: np.ndarray) -> float:
    """Step-wise area under a precision-recall curve given in order of rising recall:
    sum over points of (recall gained) x precision."""
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def read_issues(path: Path) -> dict[str, np.ndarray]:
    """``data/label_issues.parquet`` as numpy columns (one row per training sample)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DsinkError(
            f"{path}: not a readable Parquet file ({msg}); rerun `dvc repro label_issues`"
        ) from exc
    missing = [c for c in ISSUE_COLUMNS if c not in table.column_names]
    if missing:
        raise DsinkError(f"{path}: missing column(s) {missing}; rerun `dvc repro label_issues`")
    return {c: table.column(c).to_numpy(zero_copy_only=False) for c in ISSUE_COLUMNS}


def _pct(v: Any) -> str:
    return "&ndash;" if v is None else f"{100 * v:.1f}"


def _issue_metrics_table(metrics: dict[str, Any]) -> str:
    rows = []
    for key, label in ISSUE_GROUPS:
        m = metrics if key == "overall" else metrics.get(key)
        if not isinstance(m, dict):
            continue
        auroc = m.get("auroc")
        rows.append(
            f"<tr><th>{label}</th><td>{m.get('num_flagged', '&ndash;')}</td>"
            f"<td>{m.get('num_noisy', '&ndash;')}</td><td>{_pct(m.get('precision'))}</td>"
            f"<td>{_pct(m.get('recall'))}</td><td>{_pct(m.get('f1'))}</td><td>{_auroc(auroc)}</td></tr>"
        )
    return (
        "<table class='issues'><tr><th>given label in</th><th>flagged</th><th>wrong labels</th>"
        "<th>precision %</th><th>recall %</th><th>F1 %</th><th>AUROC</th></tr>" + "".join(rows) + "</table>"
    )


def _png(pixels: np.ndarray) -> bytes:
    """One uint8 (C, H, W) image as a PNG thumbnail: small images upscaled by nearest neighbour so a 28x28
    image stays crisp and visible, large ones scaled down to fit ``THUMB_MAX``."""
    import io

    from PIL import Image

    c = pixels.shape[0]
    if c == 1:
        img = Image.fromarray(pixels[0], mode="L")
    else:
        img = Image.fromarray(np.ascontiguousarray(np.moveaxis(pixels[:3], 0, -1)), mode="RGB")
    side = max(img.size)
    if side <= THUMB_TARGET:
        k = -(-THUMB_TARGET // side)  # ceil
        img = img.resize((img.width * k, img.height * k), Image.NEAREST)
    elif side > THUMB_MAX:
        img.thumbnail((THUMB_MAX, THUMB_MAX), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def top_per_class(
    given: np.ndarray, score: np.ndarray, sample_id: np.ndarray, per_class: int
) -> dict[int, np.ndarray]:
    """Row indices of the ``per_class`` highest scores of every given label (ties by sample id), by class."""
    out: dict[int, np.ndarray] = {}
    if per_class <= 0:
        return out
    for c in np.unique(given):
        rows = np.flatnonzero(given == c)
        order = np.lexsort((sample_id[rows], -score[rows]))
        out[int(c)] = rows[order[:per_class]]
    return out


def _load_thumbnails(params_path: Path, ids: np.ndarray) -> tuple[dict[int, str], dict[int, str], str]:
    """Base64 PNG thumbnails of the training images ``ids`` (source indices), their image files (ImageFolder
    sets) and a note saying why there are none ('' when they loaded)."""
    if ids.size == 0:
        return {}, {}, ""
    from dsink.data.sources import load_source
    from dsink.params import load_params

    try:
        train = load_source(load_params(params_path).data).train
        images = train.load(ids).numpy()
    except (DsinkError, IndexError) as exc:
        return {}, {}, f"Thumbnails unavailable: the source dataset could not be read ({exc})."
    thumbs = {int(i): base64.b64encode(_png(im)).decode() for i, im in zip(ids, images, strict=True)}
    files = {int(i): train.paths[int(i)] for i in ids} if train.paths is not None else {}
    return thumbs, files, ""


def _class_name(names: list[str], c: int) -> str:
    return html.escape(str(names[c]) if 0 <= c < len(names) else str(c))


def _auroc(v: Any) -> str:
    return "&ndash;" if v is None else f"{v:.3f}"


def _pr_figure(score: np.ndarray, flag: np.ndarray, truth: np.ndarray) -> str:
    from dsink.figures import precision_recall_png

    precision, recall, _ = precision_recall_curve(score, truth)
    tp = int((flag & truth).sum())
    op = (tp / flag.sum(), tp / truth.sum()) if flag.any() else None
    ap = average_precision(precision, recall)
    png = precision_recall_png(precision, recall, op, float(truth.mean()), ap)
    caption = (
        "Precision-recall curve of issue_score against the injected noise (flagging every label that scores "
        "at least t, for every t); the dot is the stage's own rule (is_issue: the plan prefers another "
        "class), the dashed line a random ranking"
    )
    data = base64.b64encode(png).decode()
    return (
        f"<figure class='pr'><img alt='{html.escape(caption)}' src='data:image/png;base64,{data}'>"
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def _thumbnail_grid(
    cols: dict[str, np.ndarray],
    truth: np.ndarray | None,
    names: list[str],
    params_path: Path,
    per_class: int,
) -> str:
    sid, given, suggested = cols["sample_id"], cols["given_label"], cols["suggested_label"]
    score, flag = cols["issue_score"], cols["is_issue"]
    top = top_per_class(given, score, sid, per_class)
    if not top:
        return ""
    shown = np.concatenate(list(top.values()))
    thumbs, files, note = _load_thumbnails(params_path, np.unique(sid[shown]))
    key = "; &#10007; marks a label the noise injection made wrong, &#10003; a correct one"
    parts = [
        "<h3>Most suspected training images per class</h3>"
        f"<p>The {per_class} highest issue scores among the training images of every given label (a red "
        f"frame: flagged; grey: the rule keeps the label){key if truth is not None else ''}.</p>"
    ]
    if note:
        parts.append(f"<p class='note'>{html.escape(note)}</p>")
    for c, rows in sorted(top.items()):
        in_c = given == c
        tiles = []
        for r in rows:
            s_id = int(sid[r])
            img = (
                f"<img alt='training image {s_id}' src='data:image/png;base64,{thumbs[s_id]}'>"
                if s_id in thumbs
                else "<div class='noimg'>no image</div>"
            )
            mark = "" if truth is None else (" &#10007;" if truth[r] else " &#10003;")
            where = html.escape(Path(files[s_id]).name if s_id in files else f"train[{s_id}]")
            title = html.escape(files.get(s_id, f"index {s_id} of the source training set"), quote=True)
            tiles.append(
                f"<figure class='thumb {'flagged' if flag[r] else 'kept'}' title='{title}'>{img}"
                f"<figcaption>given <b>{_class_name(names, int(given[r]))}</b><br>suggested "
                f"<b>{_class_name(names, int(suggested[r]))}</b><br>score {score[r]:.3f}{mark}"
                f"<br><small>{where}</small></figcaption></figure>"
            )
        count = f"{int(flag[in_c].sum())} of {int(in_c.sum())} flagged"
        parts.append(
            f"<div class='cls'><h4>{_class_name(names, c)} <small>({count})</small></h4>"
            f"{''.join(tiles)}</div>"
        )
    return "\n".join(parts)


def label_issues_section(
    issues_path: Path,
    metrics_path: Path,
    index: CorruptedIndex,
    params_path: Path,
    per_class: int,
) -> str:
    """The HTML of the label-issues section (a how-to line when the stage's outputs are absent)."""
    head = "<h2 id='label-issues'>Label issues: training labels the transport plan disputes</h2>"
    if not issues_path.is_file():
        return (
            f"{head}<p class='note'>No label-issue outputs found ({html.escape(str(issues_path))}): run "
            "<code>dvc repro label_issues</code> to flag the training labels D-SINK's transport plan "
            "disputes, then <code>make report</code> again.</p>"
        )
    raw = read_issues(issues_path)
    cols = {
        "sample_id": np.asarray(raw["sample_id"], dtype=np.int64),
        "given_label": np.asarray(raw["given_label"], dtype=np.int64),
        "suggested_label": np.asarray(raw["suggested_label"], dtype=np.int64),
        "issue_score": np.asarray(raw["issue_score"], dtype=np.float64),
        "is_issue": np.asarray(raw["is_issue"], dtype=bool),
    }
    metrics: dict[str, Any] = {}
    if metrics_path.is_file():
        try:
            metrics = json.loads(metrics_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DsinkError(
                f"report: cannot read {metrics_path} ({exc}); rerun `dvc repro label_issues`"
            ) from exc
    sid, flag = cols["sample_id"], cols["is_issue"]
    n, k = sid.size, int(flag.sum())
    parts = [
        head,
        f"<p>The plan flags <b>{k}</b> of {n} training labels ({100 * k / max(n, 1):.1f}%): a label is "
        "flagged when the surrogate labels q put more mass on another class than on it "
        "(issue_score = 1 &minus; q[given label], suggested label = argmax q).</p>",
    ]
    scored = "precision" in metrics  # the stage scores its flags only when the noise is known
    truth = None
    if scored:
        if np.array_equal(np.sort(sid), index.sample_id):
            truth = index.is_noisy[np.searchsorted(index.sample_id, sid)]
        else:
            parts.append(
                f"<p class='note'>{html.escape(str(issues_path))} does not cover the training samples of "
                f"{html.escape(str(index.meta.get('dataset')))}'s corrupted set (an older run?): rerun "
                "<code>dvc repro label_issues</code>.</p>"
            )
        parts.append(
            f"<p>Against the injected noise ({metrics.get('num_noisy', '?')} wrong labels): precision "
            f"<b>{_pct(metrics.get('precision'))}%</b>, recall <b>{_pct(metrics.get('recall'))}%</b>, F1 "
            f"{_pct(metrics.get('f1'))}%, AUROC {_auroc(metrics.get('auroc'))}. By the class size of the "
            "given label:</p>" + _issue_metrics_table(metrics)
        )
        if truth is not None and truth.any():
            parts.append(_pr_figure(cols["issue_score"], flag, truth))
    elif metrics:
        parts.append("<p>The corrupted set knows no injected noise, so the flags are not scored.</p>")
    else:
        parts.append(f"<p class='note'>{html.escape(str(metrics_path))} not found: flags not scored.</p>")
    names = [str(x) for x in (index.meta.get("class_names") or range(index.num_classes))]
    parts.append(_thumbnail_grid(cols, truth, names, params_path, per_class))
    return "\n".join(parts)


def build(
    params_path: Path,
    corrupted: Path,
    metrics: Path,
    plots: Path,
    issues: Path | None = None,
    issues_metrics: Path | None = None,
    per_class: int = 6,
) -> str:
    try:
        params = yaml.safe_load(params_path.read_text())
        results = json.loads(metrics.read_text())
    except (OSError, json.JSONDecodeError, yaml.YAMLError) as exc:
        raise DsinkError(
            f"report: cannot read the run's params or metrics ({exc}); run `dvc repro` first"
        ) from exc
    index = read_corrupted(corrupted)
    meta = index.meta
    section = label_issues_section(
        issues or Path("data/label_issues.parquet"),
        issues_metrics or Path("metrics/label_issues.json"),
        index,
        params_path,
        per_class,
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
.swatch {{ display: inline-block; width: 14px; height: 10px; background: #4a7ab5; }}
.swatch.noisy {{ background: #d98c3f; }}
img {{ max-width: 100%; }} figure {{ display: inline-block; margin: 0.5em; vertical-align: top; }}
figcaption {{ font-size: 0.9em; color: #444; max-width: 640px; }}
.note {{ background: #fff7e0; border-left: 4px solid #e0b040; padding: 0.5em 1em; }}
.cls {{ margin: 0.5em 0 1em; }} .cls h4 {{ margin: 0.3em 0; }}
figure.thumb {{ margin: 0.25em; width: 136px; text-align: center; }}
figure.thumb img {{ image-rendering: pixelated; border: 3px solid #bbb; }}
.noimg {{ width: 96px; height: 96px; border: 3px solid #bbb; }}
figure.thumb.flagged img, figure.thumb.flagged .noimg {{ border-color: #c0392b; }}
.noimg {{ display: inline-block; line-height: 96px; color: #888; font-size: 0.8em; }}
figure.thumb figcaption {{ font-size: 0.75em; line-height: 1.25; overflow-wrap: anywhere; }}
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
{_figures(plots)}
{section}
<h2>Params</h2><pre>{html.escape(yaml.safe_dump(params, sort_keys=False))}</pre>
</body></html>
"""


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m dsink.report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--params", default="params.yaml", help="the run's params (default: %(default)s)")
    ap.add_argument(
        "--corrupted", default="data/corrupted/train.parquet", help="corrupted index (default: %(default)s)"
    )
    ap.add_argument(
        "--metrics", default="metrics/evaluate.json", help="evaluate's metrics (default: %(default)s)"
    )
    ap.add_argument(
        "--plots", default="plots", help="folder of evaluate's PNG figures (default: %(default)s)"
    )
    ap.add_argument(
        "--issues",
        default="data/label_issues.parquet",
        help="label_issues' per-sample table (default: %(default)s)",
    )
    ap.add_argument(
        "--issues-metrics",
        default="metrics/label_issues.json",
        help="label_issues' metrics (default: %(default)s)",
    )
    ap.add_argument(
        "--per-class",
        type=_non_negative,
        default=6,
        help="most suspected training images shown per class, 0 for none (default: %(default)s)",
    )
    ap.add_argument("--out", default="report.html", help="the HTML page to write (default: %(default)s)")
    args = ap.parse_args(argv)
    try:
        page = build(
            Path(args.params),
            Path(args.corrupted),
            Path(args.metrics),
            Path(args.plots),
            Path(args.issues),
            Path(args.issues_metrics),
            args.per_class,
        )
    except DsinkError as exc:
        print(f"report: error: {exc}", file=sys.stderr)
        return 2
    with atomic_path(args.out) as tmp:
        tmp.write_text(page)
    print(f"report: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
