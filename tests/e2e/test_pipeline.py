"""End to end: `dvc repro` in a temporary copy of the repo, on the tiny synthetic dataset.

Checks the contract's artifacts exist with the right shapes, that every number of `metrics/evaluate.json`
is what the logits files and the test labels give when recomputed here (independently of
`dsink.evaluation`), that a params change reruns only the stages downstream of it, and that a no-op repro
runs nothing.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import ALL_STAGES, DVC, env, ran_stages, run

pytestmark = pytest.mark.timeout(900)

# metrics/evaluate.json key -> the logits file it is computed from
LOGITS = {
    "dsink": "data/student/logits.parquet",
    "imbalance_teacher": "data/logits/imbalance.parquet",
    "noise_teacher": "data/logits/noise.parquet",
    "ce": "data/baselines/ce/logits.parquet",
    "la_small_loss": "data/baselines/la_small_loss/logits.parquet",
}


# ----------------------------------------------------------------- an oracle for metrics/evaluate.json
# Written from the documented definitions (README, docs/contract.md, dsink/evaluation.py's docstring),
# with numpy and pyarrow only: no code of dsink.evaluation is used.


def read_logits_file(path: Path) -> tuple[dict[str, dict[int, np.ndarray]], dict]:
    """``{split: {sample_id: logits row}}`` and the file's ``dsink`` metadata."""
    table = pq.read_table(path)
    meta = json.loads((table.schema.metadata or {}).get(b"dsink", b"{}"))
    rows: dict[str, dict[int, np.ndarray]] = {}
    z = np.asarray(table.column("logits").to_pylist(), dtype=np.float64)
    for split, sid, row in zip(
        table.column("split").to_pylist(), table.column("sample_id").to_pylist(), z, strict=True
    ):
        rows.setdefault(split, {})[int(sid)] = row
    return rows, meta


def balanced(z: np.ndarray, meta: dict, noisy: np.ndarray, C: int) -> np.ndarray:
    """The documented evaluation space: ``raw + train_offset - train_log_prior``; no ``train_offset``
    means 0, no ``train_log_prior`` means the add-one smoothed noisy-label prior."""
    offset = np.asarray(meta.get("train_offset") or np.zeros(C), dtype=np.float64)
    log_prior = meta.get("train_log_prior")
    if log_prior is None:
        counts = np.bincount(noisy, minlength=C).astype(np.float64)
        log_prior = np.log((counts + 1) / (counts.sum() + C))
    return z + offset - np.asarray(log_prior, dtype=np.float64)


def shot_metrics(pred, labels, clean_counts, many_threshold, few_threshold) -> dict:
    """top1 and sample-weighted accuracy within many (> many_threshold training samples), few
    (< few_threshold) and medium (the rest) classes; null for an empty group."""
    hit = pred == labels
    many = clean_counts > many_threshold
    few = clean_counts < few_threshold
    out = {"top1": float(hit.mean())}
    for name, group in (("many", many), ("medium", ~many & ~few), ("few", few)):
        sel = group[labels]
        out[name] = float(hit[sel].mean()) if sel.any() else None
    return out


def load_test_labels(repo: Path) -> np.ndarray:
    """The clean test labels of the dataset the repo's params.yaml names (the synthetic set here)."""
    from dsink.data.sources import load_source
    from dsink.params import load_params

    return np.asarray(load_source(load_params(repo / "params.yaml").data).test.labels, dtype=np.int64)


def expected_metrics(repo: Path) -> dict[str, dict]:
    """Every model's test, label-repair and validation metrics recomputed from the artifacts."""
    from dsink.params import load_params

    params = load_params(repo / "params.yaml")
    test_labels = load_test_labels(repo)
    corrupted = pq.read_table(repo / "data/corrupted/train.parquet").to_pydict()
    ids = np.asarray(corrupted["sample_id"], dtype=np.int64)
    clean = np.asarray(corrupted["clean_label"], dtype=np.int64)
    noisy = np.asarray(corrupted["noisy_label"], dtype=np.int64)
    C = json.loads(pq.read_schema(repo / "data/corrupted/train.parquet").metadata[b"dsink"])["num_classes"]
    counts = np.bincount(clean, minlength=C)
    val_path = repo / "data/corrupted/val.parquet"
    val = pq.read_table(val_path).to_pydict() if val_path.exists() else {"sample_id": [], "label": []}
    val_ids = np.asarray(val["sample_id"], dtype=np.int64)
    val_labels = np.asarray(val["label"], dtype=np.int64)
    thresholds = (params.evaluate.many_threshold, params.evaluate.few_threshold)

    def splits(name: str) -> dict[str, np.ndarray]:
        rows, meta = read_logits_file(repo / LOGITS[name])
        out = {
            "train": np.stack([rows["train"][i] for i in ids]),
            "test": np.stack([rows["test"][i] for i in range(test_labels.size)]),
        }
        if val_ids.size:
            out["val"] = np.stack([rows["val"][i] for i in val_ids])
        return {k: balanced(v, meta, noisy, C) for k, v in out.items()}

    def log_mean_softmax(*zs: np.ndarray) -> np.ndarray:
        p = [np.exp(z - z.max(1, keepdims=True)) for z in zs]
        return np.log(np.mean([q / q.sum(1, keepdims=True) for q in p], axis=0))

    models = {name: splits(name) for name in LOGITS}
    teachers = models["imbalance_teacher"], models["noise_teacher"]
    models["teacher_average"] = {k: log_mean_softmax(*(t[k] for t in teachers)) for k in teachers[0]}
    expected = {}
    for name, z in models.items():
        m = shot_metrics(z["test"].argmax(1), test_labels, counts, *thresholds)
        pred = z["train"].argmax(1)
        wrong = clean != noisy
        assert wrong.any(), "the tiny params inject noise"
        m["corrected"] = float((pred[wrong] == clean[wrong]).mean())
        m["memorised"] = float((pred[wrong] == noisy[wrong]).mean())
        m["val"] = shot_metrics(z["val"].argmax(1), val_labels, counts, *thresholds) if val_ids.size else None
        expected[name] = m
    return expected


def assert_metrics_match(metrics: dict, expected: dict) -> None:
    """Each expected number equals the reported one (to 1e-9); a null is expected exactly where reported."""

    def leaves(tree: dict, prefix: str):
        for key, value in tree.items():
            if isinstance(value, dict):
                yield from leaves(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    for path, want in leaves(expected, ""):
        got = metrics
        for part in path.split("."):
            assert isinstance(got, dict) and part in got, (path, "not reported")
            got = got[part]
        assert (got is None and want is None) or got == pytest.approx(want, abs=1e-9), (path, got, want)


def test_repro_corrupt_then_everything(repo: Path):
    out = run([DVC, "repro", "corrupt"], repo)
    assert ran_stages(out) == {"corrupt"}
    table = pq.read_table(repo / "data/corrupted/train.parquet")
    assert table.column_names == ["sample_id", "clean_label", "noisy_label", "is_noisy"]
    out = run([DVC, "repro"], repo)
    assert ran_stages(out) == ALL_STAGES - {"corrupt"}
    metrics = json.loads((repo / "metrics/evaluate.json").read_text())
    expected = expected_metrics(repo)
    assert set(expected) == {
        "dsink",
        "imbalance_teacher",
        "noise_teacher",
        "teacher_average",
        "ce",
        "la_small_loss",
    }
    assert_metrics_match(metrics, expected)
    # the student's raw logits are its balanced prediction (README): with tau = 1 evaluation reads them as is
    rows, _ = read_logits_file(repo / LOGITS["dsink"])
    labels = load_test_labels(repo)
    raw = np.stack([rows["test"][i] for i in range(labels.size)])
    assert metrics["dsink"]["top1"] == pytest.approx(float((raw.argmax(1) == labels).mean()), abs=1e-9)
    logits = pq.read_table(repo / "data/logits/noise.parquet")
    assert logits.schema.field("logits").type.list_size == 4
    for png in ("per_class", "confusion", "curves", "corrected"):
        assert (repo / "plots" / f"{png}.png").stat().st_size > 1000
    # nothing changed: nothing runs
    assert ran_stages(run([DVC, "repro"], repo)) == set()
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "baseline"], repo)


def test_params_change_reruns_only_downstream(repo: Path):
    if not (repo / "dvc.lock").exists():
        pytest.skip("needs the pipeline from the previous test")
    # the shared training section is read by every stage that trains or loads a model (dvc status lists
    # the stages whose own params changed; what is downstream of them reruns on their new outputs)
    text = (repo / "params.yaml").read_text()
    edited = yaml.safe_load(text)
    edited["train"]["epochs"] = 1
    (repo / "params.yaml").write_text(yaml.safe_dump(edited, sort_keys=False))
    status = subprocess.run([DVC, "status", "--json"], cwd=repo, env=env(), capture_output=True, text=True)
    assert status.returncode == 0, status.stderr
    changed = set(json.loads(status.stdout))
    (repo / "params.yaml").write_text(text)
    trainings = {f"{s}@{r}" for s in ("train_teacher", "dump_logits") for r in ("imbalance", "noise")}
    assert changed == trainings | {"train_baseline@ce", "train_baseline@la_small_loss", "distill"}
    # one model's override of a shared key (a key params.yaml does not write: `++`) reruns that model only
    out = run([DVC, "exp", "run", "-S", "++teachers.noise.epochs=1"], repo)
    student = {"distill", "evaluate", "label_issues"}
    assert ran_stages(out) == {"train_teacher@noise", "dump_logits@noise"} | student
    # the shot groups are read by evaluate and label_issues (its per-group scores), nothing trains
    out = run([DVC, "exp", "run", "-S", "evaluate.few_threshold=10"], repo)
    assert ran_stages(out) == {"evaluate", "label_issues"}
    out = run([DVC, "exp", "run", "-S", "data.noise.rate=0.2", "corrupt"], repo)
    assert ran_stages(out) == {"corrupt"}


def test_bring_your_own_teacher_reruns_only_the_student_stages(repo: Path):
    """A contract-shaped logits file from elsewhere replaces the noise teacher without training it, and
    `evaluate` reports exactly the accuracy that file was built to have."""
    if not (repo / "dvc.lock").exists():
        pytest.skip("needs the pipeline from the first test")
    run(["git", "checkout", "-q", "--", "."], repo)
    run([DVC, "checkout", "-q"], repo)
    from dsink.artifacts import logits_table, read_corrupted, write_logits

    idx = read_corrupted(repo / "data/corrupted/train.parquet")
    C = idx.num_classes
    test_labels = load_test_labels(repo)
    val_path = repo / "data/corrupted/val.parquet"
    val = pq.read_table(val_path).to_pydict() if val_path.exists() else {"sample_id": [], "label": []}
    val_ids, val_labels = np.asarray(val["sample_id"], np.int64), np.asarray(val["label"], np.int64)
    # "Another framework": right on every training sample's clean label, wrong on every third test and
    # validation image. A margin of 50 dwarfs any class-prior shift (|log prior| < 5 here), so its
    # predictions are the same in every space evaluation could read it in.
    test_pred = np.where(np.arange(test_labels.size) % 3 == 0, (test_labels + 1) % C, test_labels)
    val_pred = np.where(np.arange(val_ids.size) % 3 == 0, (val_labels + 1) % C, val_labels)
    z = 50 * np.eye(C)[np.concatenate([idx.clean_label, test_pred, val_pred])].astype(np.float32)
    split = np.array(["train"] * idx.sample_id.size + ["test"] * test_labels.size + ["val"] * val_ids.size)
    ids = np.concatenate([idx.sample_id, np.arange(test_labels.size), val_ids])
    write_logits(
        repo / "data/logits/noise.parquet", logits_table(split.astype(object), ids, z, {"role": "noise"})
    )
    run([DVC, "commit", "-f", "dump_logits@noise"], repo)
    out = run([DVC, "repro"], repo)
    assert ran_stages(out) == {"distill", "evaluate", "label_issues"}
    metrics = json.loads((repo / "metrics/evaluate.json").read_text())["noise_teacher"]
    assert metrics["top1"] == pytest.approx(float((test_pred == test_labels).mean()), abs=1e-12)
    assert metrics["top1"] == pytest.approx(2 / 3, abs=1 / test_labels.size)  # the file's design
    assert (metrics["corrected"], metrics["memorised"]) == (1.0, 0.0)
    if val_ids.size:
        assert metrics["val"]["top1"] == pytest.approx(float((val_pred == val_labels).mean()), abs=1e-12)
    # and every other number still matches the recomputation (the student now learnt from this file)
    assert_metrics_match(json.loads((repo / "metrics/evaluate.json").read_text()), expected_metrics(repo))


def test_queued_sweep_lists_each_experiment(repo: Path):
    if not (repo / "dvc.lock").exists():
        pytest.skip("needs the pipeline from the first test")
    run(["git", "checkout", "-q", "--", "."], repo)
    run([DVC, "checkout", "-q", "--force"], repo)
    run([DVC, "exp", "run", "--queue", "-S", "data.noise.rate=0.2,0.4"], repo)
    run([DVC, "queue", "start", "-j", "1"], repo)
    deadline = time.time() + 600
    while time.time() < deadline:  # the worker runs in the background
        status = run([DVC, "queue", "status"], repo)
        if not re.search(r"\b(Queued|Running)\b", status):
            break
        time.sleep(3)
    assert "Failed" not in status, status
    shown = json.loads(run([DVC, "exp", "show", "--json"], repo))
    rates = {}
    for commit in shown:
        for exp in commit.get("experiments") or []:
            for rev in exp.get("revs", []):
                data = rev.get("data") or {}
                params = data.get("params", {}).get("params.yaml", {}).get("data", {})
                metrics = data.get("metrics", {}).get("metrics/evaluate.json", {}).get("data", {})
                rate = params.get("data", {}).get("noise", {}).get("rate")
                if rate is not None and metrics:
                    rates[rate] = metrics["dsink"]["top1"]
    assert {0.2, 0.4} <= set(rates), rates
