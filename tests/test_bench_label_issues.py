"""bench/label_issues.py: the k-fold helpers (folds partition the rows, are stratified, and no row is
predicted by a model that trained on it), the whole comparison on a tiny synthetic workspace with a
1-epoch 2-fold CE (the real `corrupt` and `label_issues` stages, hand-made logits files), its cache, and
the DVC-experiment lookup of `--grid`. The cleanlab parts are skipped where cleanlab is not installed
(CI installs `.[dev]`; cleanlab is in the `bench` extra).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from dsink.artifacts import logits_table, read_corrupted, write_logits
from dsink.cross_fit import assign_folds
from dsink.evaluation import class_groups
from dsink.label_issue_metrics import grouped_detection_scores
from dsink.priors import label_log_prior

ROOT = Path(__file__).resolve().parents[1]


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_label_issues", ROOT / "bench" / "label_issues.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


bench = _load_bench()


# ------------------------------------------------------------------------------------------ the folds


def test_no_row_is_predicted_by_a_model_that_trained_on_it():
    labels = np.repeat(np.arange(3), [40, 13, 5])
    folds = assign_folds(labels, 3, seed=0)
    trained_on: dict[int, set[int]] = {}

    def fit_predict(train_rows, held_rows, fold):
        assert not set(train_rows) & set(held_rows)
        assert set(train_rows) | set(held_rows) == set(range(labels.size))
        trained_on[fold] = set(train_rows.tolist())
        # the "model" of this fold predicts (its fold id, the row it was asked about)
        return np.stack([np.full(held_rows.size, fold), held_rows], axis=1)

    pred, seconds = bench.out_of_fold(folds, fit_predict)
    assert len(seconds) == 3 and sorted(trained_on) == [0, 1, 2]
    np.testing.assert_array_equal(pred[:, 1], np.arange(labels.size))  # each row predicted, in place
    np.testing.assert_array_equal(pred[:, 0], folds)
    for row, (model, _) in enumerate(pred):
        assert row not in trained_on[int(model)]


def test_out_of_fold_reuses_finished_folds():
    folds = assign_folds(np.zeros(10, dtype=np.int64), 2, seed=0)
    kept = {}
    called = []

    def fit_predict(train_rows, held_rows, fold):
        called.append(fold)
        return held_rows.astype(np.float64)[:, None]

    bench.out_of_fold(folds, fit_predict, done=lambda f: None, keep=lambda f, z, s: kept.setdefault(f, z))
    called.clear()
    pred, seconds = bench.out_of_fold(folds, fit_predict, done=kept.get)
    assert called == [] and seconds == [0.0, 0.0]
    np.testing.assert_array_equal(pred[:, 0], np.arange(10))


# ----------------------------------------------------------------------------- a finished workspace


def _workspace(tmp_path: Path, write_params) -> Path:
    """A finished pipeline workspace on a tiny synthetic set: the real `corrupt` stage, hand-made teacher
    and student logits (sharp around the clean label), and the real `label_issues` stage."""
    from stages.corrupt import cli as corrupt_cli
    from stages.label_issues import cli as issues_cli

    ws = tmp_path / "ws"
    write_params(
        ws,
        {
            "data.dataset": "synthetic",
            "data.synthetic.num_classes": 4,
            "data.synthetic.train_per_class": 60,
            "data.synthetic.test_per_class": 5,
            "data.synthetic.image_size": 8,
            "data.imbalance.ratio": 5,
            "data.noise.type": "symmetric",
            "data.noise.rate": 0.3,
            "data.validation.per_class": 3,
            "baselines.ce.epochs": 1,
            "baselines.ce.batch_size": 32,
            "baselines.ce.track_every": 0,
            "evaluate.many_threshold": 40,
            "evaluate.few_threshold": 20,
        },
    )
    p = ws / "params.yaml"
    d = ws / "data"
    corrupt_cli(
        ["--params", str(p), "--out", str(d / "corrupted/train.parquet"),
         "--val-out", str(d / "corrupted/val.parquet"), "--metrics", str(ws / "metrics/corrupt.json")]
    )  # fmt: skip
    idx = read_corrupted(d / "corrupted/train.parquet")
    rng = np.random.default_rng(1)
    n, C, n_test = idx.sample_id.size, idx.num_classes, 20
    lp = label_log_prior(idx.noisy_label, C)
    for path, prior, meta in (
        (d / "logits/noise.parquet", lp, {"train_offset": [0.0] * C}),
        (d / "logits/imbalance.parquet", 0.0, {"train_offset": lp.tolist()}),
        (d / "student/logits.parquet", 0.0, {}),
    ):
        z = 4.0 * np.eye(C)[idx.clean_label] + rng.standard_normal((n, C)) + prior
        test = rng.standard_normal((n_test, C))
        split = ["train"] * n + ["test"] * n_test
        ids = np.concatenate([idx.sample_id, np.arange(n_test)])
        meta = {"dataset": "synthetic", "num_classes": C, **meta}
        path.parent.mkdir(parents=True, exist_ok=True)
        write_logits(path, logits_table(split, ids, np.concatenate([z, test]), meta))
    issues_cli(
        ["--params", str(p), "--corrupted", str(d / "corrupted/train.parquet"),
         "--val", str(d / "corrupted/val.parquet"), "--imbalance-logits", str(d / "logits/imbalance.parquet"),
         "--noise-logits", str(d / "logits/noise.parquet"),
         "--student-logits", str(d / "student/logits.parquet"),
         "--out", str(d / "label_issues.parquet"), "--csv", str(d / "label_issues.csv"),
         "--metrics", str(ws / "metrics/label_issues.json")]
    )  # fmt: skip
    return ws


def test_end_to_end_on_a_tiny_workspace(tmp_path, write_params, monkeypatch, capsys):
    pytest.importorskip("cleanlab")
    from cleanlab.filter import find_label_issues

    import dsink.engine
    import dsink.inference

    ws = _workspace(tmp_path, write_params)
    idx = read_corrupted(ws / "data/corrupted/train.parquet")
    # record which sample ids each fold's model trained on and which ones it was asked to predict
    trained, predicted = [], []
    real_train, real_predict = dsink.engine.train, dsink.inference.predict_logits

    def spy_train(model, objective, data, *a, **kw):
        trained.append(np.asarray(data.ids).copy())
        return real_train(model, objective, data, *a, **kw)

    def spy_predict(model, split, ids, *a, **kw):
        predicted.append(np.asarray(ids).copy())
        return real_predict(model, split, ids, *a, **kw)

    monkeypatch.setattr(dsink.engine, "train", spy_train)
    monkeypatch.setattr(dsink.inference, "predict_logits", spy_predict)
    out = tmp_path / "result.json"
    bench.main(["--workspace", str(ws), "--folds", "2", "--out", str(out)])
    table = capsys.readouterr().out
    for _, label in bench.DETECTORS:
        assert label in table
    res = json.loads(out.read_text())

    # two models, each trained on one fold and predicting the other: disjoint, together every sample
    assert len(trained) == len(predicted) == 2
    for tr, held in zip(trained, predicted, strict=True):
        assert not set(tr) & set(held)
        assert np.array_equal(np.sort(np.concatenate([tr, held])), np.sort(idx.sample_id))
    assert np.array_equal(np.sort(np.concatenate(predicted)), np.sort(idx.sample_id))

    # the cache: logits and the fold of every row (stratified by the given label)
    kf = res["ce_kfold"]
    assert kf["cached"] is False and kf["folds"] == 2 and kf["epochs"] == 1 and kf["train_seconds"] > 0
    with np.load(kf["cache_file"]) as z:
        logits, fold, sid = z["logits"], z["fold"], z["sample_id"]
    np.testing.assert_array_equal(sid, idx.sample_id)
    held_ids = {int(f): set(predicted[f].tolist()) for f in range(2)}
    assert all(int(s) in held_ids[int(f)] for s, f in zip(sid, fold, strict=True))
    for c in range(idx.num_classes):
        per_fold = np.bincount(fold[idx.noisy_label == c], minlength=2)
        assert abs(per_fold[0] - per_fold[1]) <= 1
    assert kf["fold_sizes"] == np.bincount(fold).tolist()

    # D-SINK's numbers are grouped_detection_scores of data/label_issues.parquet, nothing else
    issues = pq.read_table(ws / "data/label_issues.parquet").to_pandas().set_index("sample_id")
    issues = issues.loc[idx.sample_id]
    groups = class_groups(idx.clean_counts(), 40, 20)
    expected = grouped_detection_scores(
        issues["is_issue"].to_numpy(), issues["issue_score"].to_numpy(), idx.is_noisy, idx.noisy_label, groups
    )
    got = {k: v for k, v in res["detectors"]["dsink"].items() if k in ("overall", "many", "medium", "few")}
    assert got == json.loads(json.dumps(expected))
    assert all(len(groups[g]) for g in ("many", "medium", "few"))  # every group is populated here

    # cleanlab's flags on the cached out-of-fold probabilities, and the disagreement detector
    p = bench.softmax(logits)
    flags = find_label_issues(idx.noisy_label, p, n_jobs=1)
    assert res["detectors"]["cleanlab_ce_cv"]["overall"]["num_flagged"] == int(flags.sum())
    disagree = (p.argmax(1) != idx.noisy_label).sum()
    assert res["detectors"]["ce_cv_disagrees"]["overall"]["num_flagged"] == int(disagree)
    assert res["detectors"]["cleanlab_imb"]["in_sample"] is True
    assert res["num_samples"] == idx.sample_id.size
    assert res["realised_noise_rate"] == pytest.approx(idx.is_noisy.mean())

    # a second run reads the cache: no training, the same table
    trained.clear()
    bench.main(["--workspace", str(ws), "--folds", "2", "--out", str(out)])
    again = json.loads(out.read_text())
    assert trained == [] and again["ce_kfold"]["cached"] is True
    assert again["detectors"] == res["detectors"]
    assert again["ce_kfold"]["fold_seconds"] == kf["fold_seconds"]


def test_missing_workspace_file_is_one_line(tmp_path, write_params, capsys):
    pytest.importorskip("cleanlab")
    ws = tmp_path / "ws"
    write_params(ws, {"data.dataset": "synthetic"})
    with pytest.raises(SystemExit) as exc:
        bench.main(["--workspace", str(ws), "--out", str(tmp_path / "x.json")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.parquet: not found" in err[0]
    assert not (tmp_path / "x.json").exists()


def test_help_runs_without_a_workspace():
    res = subprocess.run(
        [sys.executable, str(ROOT / "bench/label_issues.py"), "--help"], capture_output=True, text=True
    )
    assert res.returncode == 0 and "--grid" in res.stdout and "cleanlab" in res.stdout


# ------------------------------------------------------------------------------------ the --grid lookup


def test_grid_names_follow_the_accuracy_bench():
    cells = bench.grid_names([100, 10], ["sym0.4", "asym0.4", "imb0.4"], [0])
    names = [c[0] for c in cells]
    assert names == [
        "acc-r100-sym0.4-s0", "acc-r100-asym0.4-s0", "acc-r100-imb0.4-s0",
        "acc-r10-sym0.4-s0", "acc-r10-asym0.4-s0", "acc-r10-imb0.4-s0",
    ]  # fmt: skip
    assert cells[1][2] == ("asym0.4", "asymmetric", 0.4)


def test_find_experiments_reads_dvc_experiment_refs(tmp_path):
    def git(*args: str) -> str:
        env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
               "GIT_COMMITTER_EMAIL": "t@t", "PATH": "/usr/bin:/bin"}  # fmt: skip
        return subprocess.run(
            ["git", *args], cwd=tmp_path, check=True, capture_output=True, text=True, env=env
        ).stdout.strip()

    git("init", "-q")
    git("commit", "-q", "--allow-empty", "-m", "base")
    base = git("rev-parse", "HEAD")
    git("commit", "-q", "--allow-empty", "-m", "exp")
    exp = git("rev-parse", "HEAD")
    # the layout DVC uses: refs/exps/<2 hex>/<38 hex>/<exp name>, plus queue internals to be ignored
    git("update-ref", f"refs/exps/{base[:2]}/{base[2:]}/acc-r100-sym0.4-s0", exp)
    git("update-ref", "refs/exps/celery/stash", exp)
    found = bench.find_experiments(tmp_path)
    assert found == {"acc-r100-sym0.4-s0": exp}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_grid_over_a_real_dvc_experiment(tmp_path, monkeypatch):
    """`--grid` on a tiny repo copy with one real `dvc exp run` (the workspace run, named as the accuracy
    bench names cells): the experiment's files come out of git and the DVC cache, D-SINK's numbers are the
    experiment's own metrics/label_issues.json, and an experiment without data/label_issues.parquet gets
    it from the stage code, identical."""
    pytest.importorskip("cleanlab")
    spec = importlib.util.spec_from_file_location("e2e_conftest", ROOT / "tests" / "e2e" / "conftest.py")
    assert spec is not None and spec.loader is not None
    e2e = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(e2e)

    repo = e2e.copy_repo(tmp_path / "repo")
    for stray in (repo / "data").rglob("*"):  # stage outputs lying untracked in this checkout, if any
        if stray.is_file() and stray.name not in (".gitignore", ".gitkeep"):
            stray.unlink()
    e2e.tiny_params(repo / "params.yaml")
    (repo / "data" / "raw").mkdir(parents=True, exist_ok=True)
    for cmd in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-qm", "init"]):
        e2e.run(["git", *cmd], repo)
    e2e.run([e2e.DVC, "exp", "run", "-n", "acc-r5-sym0.4-s0"], repo)
    for key, value in e2e.env().items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "grid.json"
    args = ["--grid", "--repo", str(repo), "--ratios", "5", "--noise", "sym0.4", "sym0.2", "--seeds", "0"]
    bench.main([*args, "--folds", "2", "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["missing"] == ["acc-r5-sym0.2-s0"] and len(res["results"]) == 1
    cell = res["results"][0]
    rev = bench.find_experiments(repo)["acc-r5-sym0.4-s0"]
    assert cell["experiment"] == "acc-r5-sym0.4-s0" and cell["rev"] == rev
    assert cell["label_issues_recomputed"] is False and cell["ce_kfold"]["epochs"] == 2
    shown = subprocess.run(
        ["git", "show", f"{rev}:metrics/label_issues.json"], cwd=repo, check=True, capture_output=True
    ).stdout
    metrics = json.loads(shown)
    dsink = cell["detectors"]["dsink"]
    for key in ("precision", "recall", "f1", "auroc", "num_flagged"):
        assert dsink["overall"][key] == pytest.approx(metrics[key])
    for g in ("many", "medium", "few"):
        assert dsink[g] == pytest.approx(metrics[g])

    # an experiment that predates the label_issues stage: the file is computed, and equals the stage's
    import dvc.api

    real_open = dvc.api.open

    def no_issues(path, *a, **kw):
        if str(path) == str(bench.ISSUES):
            raise FileNotFoundError(path)
        return real_open(path, *a, **kw)

    monkeypatch.setattr(dvc.api, "open", no_issues)
    ws, recomputed = bench.materialise(repo, rev, tmp_path / "old")
    assert recomputed
    kept = pq.read_table(Path(cell["workspace"]) / bench.ISSUES)
    assert pq.read_table(ws / bench.ISSUES).equals(kept)


def test_with_student_swaps_only_the_student_and_its_params_and_recomputes_the_issues(tmp_path, monkeypatch):
    ws, var = tmp_path / "ws", tmp_path / "variant"
    for rel in (bench.CORRUPTED, bench.VAL, bench.IMBALANCE, bench.NOISE, bench.STUDENT, bench.ISSUES):
        (ws / rel).parent.mkdir(parents=True, exist_ok=True)
        (ws / rel).write_text(f"exp {rel}")
    (ws / "params.yaml").write_text("data: {root: /abs/raw}\ndistill: {class_totals_imbalance_weight: 1.0}\n")
    var.mkdir()
    (var / "logits.parquet").write_text("variant student")
    (var / "params.yaml").write_text(
        "data: {root: data/raw}\ndistill: {class_totals_imbalance_weight: 0.3}\n"
    )
    calls = []
    monkeypatch.setattr(
        bench, "compute_issues", lambda d: (calls.append(d), (d / bench.ISSUES).write_text("new"))
    )
    dest = bench.with_student(ws, var, tmp_path / "out")
    assert calls == [dest]
    assert (dest / bench.STUDENT).read_text() == "variant student"
    assert (dest / bench.NOISE).read_text() == f"exp {bench.NOISE}"  # the teachers are the experiment's
    assert (dest / bench.ISSUES).read_text() == "new"  # not the experiment's issues
    params = (dest / "params.yaml").read_text()
    assert "0.3" in params and "/abs/raw" in params  # the variant's params, the workspace's data root
    bench.with_student(ws, var, dest)  # done already: not recomputed
    assert calls == [dest]
