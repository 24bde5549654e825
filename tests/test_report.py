"""`make report`: one self-contained HTML page with params, corruption, metrics, embedded figures and the
label-issues section (summary, scores per shot group, precision-recall curve, suspected images per class).
"""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest

from dsink import report
from dsink.artifacts import CorruptedIndex, read_corrupted, write_corrupted

SIX = (
    "D-SINK student",
    "imbalance teacher f_L",
    "noise teacher f_N",
    "average of the two teachers",
    "plain cross-entropy",
    "LA + small-loss (one model)",
)


def _cli(d: Path, *extra: str) -> int:
    return report.main(
        [
            "--params", str(d / "params.yaml"), "--corrupted", str(d / "train.parquet"),
            "--metrics", str(d / "evaluate.json"), "--plots", str(d / "plots"),
            "--issues", str(d / "issues.parquet"), "--issues-metrics", str(d / "issues.json"),
            "--out", str(d / "report.html"), *extra,
        ]
    )  # fmt: skip


def test_report_is_self_contained(tmp_path):
    meta = {
        "dataset": "synthetic",
        "num_classes": 2,
        "class_names": ["cat", "<dog>"],
        "class_counts": [30, 3],
        "noisy_class_counts": [25, 8],
        "noise_rate": 0.25,
        "imbalance": {"profile": "exp", "ratio": 10},
        "noise": {"type": "symmetric", "rate": 0.3},
    }
    lab = np.array([0, 1])
    write_corrupted(
        tmp_path / "train.parquet", CorruptedIndex(np.arange(2), lab, lab, np.zeros(2, bool), meta)
    )
    metrics = {
        name: {"top1": 0.5, "many": 0.75, "medium": None, "few": 0.125, "corrected": 0.5, "memorised": 0.25}
        for name in ("dsink", "imbalance_teacher", "noise_teacher")
    }
    metrics["dsink"]["val"] = {"top1": 0.375, "many": 1.0, "medium": None, "few": 0.0625}
    metrics["noise_rate"] = {"estimate": 0.3125, "true": 0.25}
    (tmp_path / "evaluate.json").write_text(json.dumps(metrics))
    (tmp_path / "params.yaml").write_text("seed: 0\n")
    plots = tmp_path / "plots"
    plots.mkdir()
    png = b"\x89PNG\r\n\x1a\nfake"
    (plots / "confusion.png").write_bytes(png)
    assert _cli(tmp_path) == 0
    page = (tmp_path / "report.html").read_text()
    assert base64.b64encode(png).decode() in page  # figure embedded, not linked
    assert "http" not in page.replace("http-equiv", "")  # nothing fetched when opened
    assert "12.50" in page and "&lt;dog&gt;" in page and "25.00% of labels wrong" in page
    assert page.count("<tr>") >= 4
    assert "37.50" in page and "6.25" in page  # the student's val top-1 and val few
    assert "estimated by the noise teacher: 31.25 %; realised: 25.00 %" in page


def test_report_without_a_run_is_one_line(tmp_path, capsys):
    code = report.main(["--params", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "r.html")])
    assert code == 2 and not (tmp_path / "r.html").exists()
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


# ------------------------------------------------------------------ a run with label issues


def _run_dir(tmp_path: Path, write_params, noise_type: str = "symmetric", issues: bool = True) -> Path:
    """A corrupted synthetic set (the real `corrupt` stage, 8x8 greyscale images), evaluate metrics of all
    six models, the four figures, and (``issues``) the label_issues outputs built from hand-made surrogate
    labels q by the stage's own rule and scoring code."""
    from dsink.evaluation import class_groups
    from dsink.label_issue_metrics import grouped_detection_scores, has_ground_truth
    from dsink.label_issues import find_issues, write_issues
    from stages.corrupt import cli as corrupt_cli

    write_params(
        tmp_path,
        {
            "data.dataset": "synthetic",
            "data.synthetic.num_classes": 4,
            "data.synthetic.train_per_class": 60,
            "data.synthetic.test_per_class": 2,
            "data.synthetic.image_size": 8,
            "data.synthetic.channels": 1,
            "data.imbalance.ratio": 10,
            "data.noise.type": noise_type,
            "data.noise.rate": 0.3 if noise_type != "none" else 0.0,
            "data.validation.per_class": 0,
        },
    )
    corrupt_cli(["--params", str(tmp_path / "params.yaml"), "--out", str(tmp_path / "train.parquet"),
                 "--val-out", str(tmp_path / "val.parquet"),
                 "--metrics", str(tmp_path / "corrupt.json")])  # fmt: skip
    row = {"top1": 0.5, "many": 0.75, "medium": 0.5, "few": 0.25, "corrected": 0.5, "memorised": 0.25}
    keys = ("dsink", "imbalance_teacher", "noise_teacher", "teacher_average", "ce", "la_small_loss")
    (tmp_path / "evaluate.json").write_text(json.dumps({k: dict(row, val=None) for k in keys}))
    plots = tmp_path / "plots"
    plots.mkdir()
    for stem in ("per_class", "confusion", "curves", "corrected"):
        (plots / f"{stem}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + stem.encode())
    if not issues:
        return tmp_path
    idx = read_corrupted(tmp_path / "train.parquet")
    rng = np.random.default_rng(0)
    C = idx.num_classes
    # q leans on the clean label (so noisy labels get flagged) with random spread, some scores tied
    q = np.round(rng.dirichlet(np.ones(C), idx.sample_id.size) + 0.4 * np.eye(C)[idx.clean_label], 1)
    q /= q.sum(1, keepdims=True)
    found = find_issues(q, idx.noisy_label, idx.sample_id)
    write_issues(str(tmp_path / "issues.parquet"), found, {"dataset": "synthetic", "num_classes": C})
    m = {"num_samples": int(idx.sample_id.size), "num_flagged": int(found.is_issue.sum())}
    if has_ground_truth(idx.meta):
        groups = class_groups(idx.clean_counts(), 40, 10)
        s = grouped_detection_scores(found.is_issue, found.issue_score, idx.is_noisy, idx.noisy_label, groups)
        m.update(s.pop("overall"))
        m.update(s)
    (tmp_path / "issues.json").write_text(json.dumps(m))
    return tmp_path


def _section(page: str) -> str:
    start = page.index("id='label-issues'")
    return page[start : page.index("<h2>Params</h2>")]


def _classes(section: str) -> dict[str, str]:
    """{class heading: that class's block of thumbnails}."""
    blocks = section.split("<div class='cls'>")[1:]
    return {re.match(r"<h4>([^<]*) <small>", b).group(1): b for b in blocks}


def _decode(b64: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def test_label_issues_section_with_ground_truth(tmp_path, write_params):
    d = _run_dir(tmp_path, write_params)
    assert _cli(d, "--per-class", "15") == 0  # more than the rarest label has
    page = (d / "report.html").read_text()
    sec = _section(page)
    idx = read_corrupted(d / "train.parquet")
    m = json.loads((d / "issues.json").read_text())
    import pyarrow.parquet as pq

    t = pq.read_table(d / "issues.parquet").to_pandas()
    n, k = len(t), int(t["is_issue"].sum())
    assert f"flags <b>{k}</b> of {n} training labels" in sec
    assert f"precision <b>{100 * m['precision']:.1f}%</b>" in sec
    assert f"recall <b>{100 * m['recall']:.1f}%</b>" in sec
    table = sec[sec.index("<table class='issues'>") :]
    table = table[: table.index("</table>")]
    for label, key in (
        ("all classes", None),
        ("many-shot", "many"),
        ("medium-shot", "medium"),
        ("few-shot", "few"),
    ):
        g = m if key is None else m[key]
        cells = re.search(rf"<tr><th>{label}</th>(.*?)</tr>", table).group(1)
        assert f"<td>{g['num_flagged']}</td><td>{g['num_noisy']}</td>" in cells
    # the precision-recall curve: there, captioned, a real PNG
    assert "<figure class='pr'>" in sec and "Precision-recall curve of issue_score" in sec
    pr = re.search(r"<figure class='pr'><img[^>]*base64,([^']+)'", sec).group(1)
    assert _decode(pr).shape[0] > 100
    # thumbnails: per given label, min(15, class size) of them, highest scores first, the right pixels
    names = idx.meta["class_names"]
    from dsink.data.sources import load_source
    from dsink.params import load_params

    train = load_source(load_params(d / "params.yaml").data).train
    blocks = _classes(sec)
    assert list(blocks) == [names[c] for c in sorted(t["given_label"].unique())]
    assert min(t["given_label"].value_counts()) < 15
    assert {"flagged", "kept"} <= set(re.findall(r"<figure class='thumb (\w+)'", sec))
    assert "&#10007;" in sec and "&#10003;" in sec
    for c, name in enumerate(names):
        rows = t[t["given_label"] == c].sort_values(["issue_score", "sample_id"], ascending=[False, True])
        block = blocks[name]
        assert block.count("<figure class='thumb") == min(15, len(rows))
        assert f"({int(rows['is_issue'].sum())} of {len(rows)} flagged)" in block
        shown = [int(s) for s in re.findall(r"alt='training image (\d+)'", block)]
        assert shown == rows["sample_id"].head(15).tolist()
        for (_, r), tile in zip(
            rows.head(15).iterrows(), block.split("<figure class='thumb")[1:], strict=True
        ):
            assert tile.startswith(" flagged" if r["is_issue"] else " kept")
            assert f"given <b>{names[c]}</b>" in tile
            assert f"suggested <b>{names[int(r['suggested_label'])]}</b>" in tile
            assert f"score {r['issue_score']:.3f}" in tile
            noisy = bool(idx.is_noisy[np.searchsorted(idx.sample_id, r["sample_id"])])
            assert ("&#10007;" in tile) == noisy and ("&#10003;" in tile) == (not noisy)
            pixels = _decode(re.search(r"base64,([^']+)'", tile).group(1))
            assert pixels.shape == (96, 96)  # 8x8 upscaled 12x by nearest neighbour
            np.testing.assert_array_equal(pixels[::12, ::12], train.load([r["sample_id"]])[0, 0].numpy())


def test_label_issues_without_ground_truth_has_no_curve(tmp_path, write_params):
    d = _run_dir(tmp_path, write_params, noise_type="none")
    assert "precision" not in json.loads((d / "issues.json").read_text())
    assert _cli(d) == 0
    sec = _section((d / "report.html").read_text())
    assert "flags <b>" in sec and "not scored" in sec
    assert "<figure class='pr'>" not in sec and "Precision-recall" not in sec
    assert "<table class='issues'>" not in sec and "&#10007;" not in sec
    assert sec.count("<figure class='thumb") > 0


def test_page_builds_without_label_issue_outputs(tmp_path, write_params):
    d = _run_dir(tmp_path, write_params, issues=False)
    assert _cli(d) == 0
    page = (d / "report.html").read_text()
    sec = _section(page)
    assert "<code>dvc repro label_issues</code>" in sec
    assert "<figure class='thumb" not in sec and "<figure class='pr'>" not in sec
    assert all(label in page for label in SIX)  # the rest of the page is still there


def test_legend_captions_and_all_six_models(tmp_path, write_params):
    d = _run_dir(tmp_path, write_params)
    assert _cli(d, "--per-class", "0") == 0
    page = (d / "report.html").read_text()
    # the class-count bars say which colour is which
    legend = re.search(r"<p class='legend'>(.*?)</p>", page).group(1)
    assert "<span class='swatch'></span> clean count" in legend
    assert "<span class='swatch noisy'></span> noisy-label count" in legend
    assert "class='bar noisy'" in page
    # figures carry human captions, never their file stems
    captions = re.findall(r"<figcaption>(.*?)</figcaption>", page)
    assert captions[:4] == [
        "Per-class test accuracy against training class size",
        "Confusion matrix of the D-SINK student (test set, rows normalised)",
        "Training curves: test top-1 and training loss per epoch",
        "Noisy training labels corrected / memorised per epoch",
    ]
    assert not {"per_class", "confusion", "curves", "corrected"} & set(captions)
    results = page[page.index("<h2>Results") : page.index("<h2>Corruption")]
    assert [label for label in SIX if f"<th>{label}</th>" in results] == list(SIX)
    assert "<figure class='thumb" not in page  # --per-class 0: no thumbnails


def test_thumbnails_degrade_without_the_source_dataset(tmp_path, write_params):
    d = _run_dir(tmp_path, write_params)
    import yaml

    params = yaml.safe_load((d / "params.yaml").read_text())
    params["data"].update(dataset="fashion_mnist", root=str(tmp_path / "nowhere"))
    (d / "params.yaml").write_text(yaml.safe_dump(params))
    assert _cli(d) == 0
    sec = _section((d / "report.html").read_text())
    assert "Thumbnails unavailable" in sec and "nowhere" in sec
    assert sec.count("<div class='noimg'>") == sec.count("<figure class='thumb") > 0


def test_cli_flags(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        report.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--issues ", "--issues-metrics", "--per-class", "data/label_issues.parquet", "default: 6"):
        assert flag in out
    with pytest.raises(SystemExit) as exc:
        report.main(["--per-class", "-1", "--out", str(tmp_path / "r.html")])
    assert exc.value.code == 2 and "--per-class" in capsys.readouterr().err


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_precision_recall_curve_matches_sklearn(seed):
    from sklearn.metrics import average_precision_score, precision_recall_curve

    rng = np.random.default_rng(seed)
    truth = rng.random(300) < 0.3
    score = np.round(rng.random(300) + 0.5 * truth, 1 + seed)  # rounding makes tied scores
    p, r, t = report.precision_recall_curve(score, truth)
    sp, sr, st = precision_recall_curve(truth, score)
    # scikit-learn: thresholds rising, plus a final (precision 1, recall 0) point without a threshold
    np.testing.assert_allclose(t, st[::-1])
    np.testing.assert_allclose(p, sp[:-1][::-1])
    np.testing.assert_allclose(r, sr[:-1][::-1])
    assert report.average_precision(p, r) == pytest.approx(average_precision_score(truth, score))


def test_precision_recall_curve_by_hand():
    p, r, t = report.precision_recall_curve(np.array([0.9, 0.5, 0.5, 0.1]), np.array([1, 0, 1, 0], bool))
    np.testing.assert_allclose(t, [0.9, 0.5, 0.1])
    np.testing.assert_allclose(p, [1.0, 2 / 3, 0.5])  # the tied pair is flagged together
    np.testing.assert_allclose(r, [0.5, 1.0, 1.0])
    with pytest.raises(ValueError):
        report.precision_recall_curve(np.array([0.3, 0.2]), np.array([False, False]))
