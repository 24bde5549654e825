"""`make report`: one self-contained HTML page with params, corruption, metrics and embedded figures."""

from __future__ import annotations

import base64
import json

import numpy as np

from dsink import report
from dsink.artifacts import CorruptedIndex, write_corrupted


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
    out = tmp_path / "report.html"
    assert (
        report.main(
            [
                "--params",
                str(tmp_path / "params.yaml"),
                "--corrupted",
                str(tmp_path / "train.parquet"),
                "--metrics",
                str(tmp_path / "evaluate.json"),
                "--plots",
                str(plots),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    page = out.read_text()
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
