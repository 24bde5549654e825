"""Label issues: D-SINK's transport-plan flags against cleanlab, on the same corrupted set.

For a finished pipeline workspace (the repo itself after `dvc repro`, or any directory with the same
layout: params.yaml, data/corrupted/{train,val}.parquet, data/logits/imbalance.parquet,
data/label_issues.parquet), every detector below flags training labels of the same corrupted set and is
scored against the injected noise (`is_noisy`, read here for evaluation only) by the same code,
`dsink.label_issue_metrics.grouped_detection_scores`: precision, recall and F1 of the flags and AUROC of
the score, overall and on the many / medium / few classes (`dsink.evaluation.class_groups` on the clean
class counts with the run's `evaluate` thresholds; a sample belongs to the group of its given label).

  dsink             D-SINK: `is_issue` / `issue_score` of data/label_issues.parquet (the `label_issues`
                    stage: the transport plan prefers another class; score 1 - q[given]).
  cleanlab_ce_cv    cleanlab as its documentation says: `cleanlab.filter.find_label_issues(labels,
                    pred_probs)` (default `filter_by`, prune_by_noise_rate) on out-of-sample probabilities
                    from k-fold cross-validation of plain cross-entropy with the backbone and schedule of
                    `baselines.ce` (the project's training engine; folds of `dsink.cross_fit.assign_folds`,
                    seeded). Score: 1 - `cleanlab.rank.get_label_quality_scores` (self-confidence).
  cleanlab_imb      cleanlab on the imbalance teacher's balanced-space probabilities
                    (`dsink.evaluation.balanced_predictions` of data/logits/imbalance.parquet):
                    out-of-sample when the teacher is cross-fitted (`teachers.imbalance.folds >= 2`, as
                    cleanlab's documentation asks), in-sample otherwise (the table says which).
  ce_cv_disagrees   the k-fold plain-CE prediction (argmax of the same out-of-sample probabilities) differs
                    from the given label; score 1 - p[given] (so its AUROC equals cleanlab_ce_cv's: the
                    two differ only in which samples they flag).

The k-fold logits are cached under <workspace>/.dsink/bench/oof_ce_<fingerprint>.npz (fingerprint: the
corrupted file's bytes, `baselines.ce`, seed, k, dataset geometry, torch version), and each finished fold
is kept while the others train, so rerunning the table costs seconds and an interrupted run resumes.

    python bench/label_issues.py                         # the repo's workspace (after `dvc repro`)
    python bench/label_issues.py --workspace DIR         # another finished workspace
    python bench/label_issues.py --grid                  # DVC experiments acc-r<ratio>-<noise>-s<seed>
    python bench/label_issues.py --grid --queue-missing --epochs 6   # queue the cells not run yet

`--grid` looks up the experiments of an accuracy grid (bench/accuracy.py's names; `--regime short`,
the default, or `memorising`; default ratios 100 and 10 x sym0.4, asym0.4, imb0.4, seed 0), copies
each finished one's params.yaml and outputs out of git and the DVC cache into
.dsink/bench/exps/<name>-<rev>/ (the workspace is never touched; an experiment that predates the
`label_issues` stage gets data/label_issues.parquet from the current stage code) and runs the
comparison there. `--queue-missing` queues the missing cells with bench/accuracy.py's overrides; run
them with `python bench/accuracy.py start --jobs 2 --wait`, then `--grid` again. `--student-variant
JSON NAME` compares the student that `bench/distill_variants.py` retrained as variant NAME on each
experiment's teachers (its `--out` JSON) instead of the experiment's own, with the label issues
recomputed from it by the stage script (the teachers and the plain-CE folds stay the experiment's).

cleanlab is a bench-only dependency: `pip install -e '.[bench]'`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
for _p in (str(ROOT), str(BENCH)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

CACHE_VERSION = "label_issues.oof_ce/2"  # 2: the folds of dsink.cross_fit
DETECTORS = (
    ("dsink", "D-SINK (transport plan)"),
    ("cleanlab_ce_cv", "cleanlab, k-fold plain CE"),
    ("cleanlab_imb", "cleanlab, imbalance teacher"),
    ("ce_cv_disagrees", "k-fold plain CE argmax != label"),
)
GROUPS = ("many", "medium", "few")
# workspace layout (relative paths, as dvc.yaml writes them)
CORRUPTED = Path("data/corrupted/train.parquet")
VAL = Path("data/corrupted/val.parquet")
IMBALANCE = Path("data/logits/imbalance.parquet")
NOISE = Path("data/logits/noise.parquet")
STUDENT = Path("data/student/logits.parquet")
ISSUES = Path("data/label_issues.parquet")


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------- the folds


FitPredict = Callable[[np.ndarray, np.ndarray, int], np.ndarray]


def out_of_fold(
    folds: np.ndarray,
    fit_predict: FitPredict,
    done: Callable[[int], np.ndarray | None] | None = None,
    keep: Callable[[int, np.ndarray, float], None] | None = None,
) -> tuple[np.ndarray, list[float]]:
    """Out-of-sample predictions: for each fold ``f``, ``fit_predict(train_rows, held_rows, f)`` trains on
    the rows of the other folds and returns its predictions for the held-out rows, in their order.

    ``done(f)`` returns a fold's predictions from an earlier run (or None), ``keep(f, z, seconds)`` stores
    a finished one. Returns the predictions of every row and the seconds each fold took (0 when reused).
    """
    k = int(folds.max()) + 1
    out: np.ndarray | None = None
    seconds = []
    for f in range(k):
        held = np.flatnonzero(folds == f)
        train_rows = np.flatnonzero(folds != f)
        z = done(f) if done is not None else None
        t = 0.0
        if z is None:
            start = time.perf_counter()
            z = np.asarray(fit_predict(train_rows, held, f))
            t = time.perf_counter() - start
            if keep is not None:
                keep(f, z, t)
        if z.shape[0] != held.size:
            raise ValueError(f"fold {f}: {z.shape[0]} predictions for {held.size} held-out rows")
        if out is None:
            out = np.empty((folds.size, *z.shape[1:]), dtype=z.dtype)
        out[held] = z
        seconds.append(t)
    assert out is not None
    return out, seconds


class _CrossEntropy:
    """Plain CE on the given labels (``train_baseline@ce``'s objective)."""

    def __call__(self, logits: Any, labels: Any, rows: Any, progress: float) -> Any:
        from dsink import losses

        return losses.cross_entropy(logits, labels)


def ce_fit_predict(corpus: Any, params: Any, seed: int) -> FitPredict:
    """A :data:`FitPredict` that trains plain CE with ``baselines.ce``'s model and schedule on the given
    training rows (``dsink.engine.train``, model initialised from ``seed``) and returns the eval-mode
    logits of the held-out rows (``dsink.inference.predict_logits``, float32, as ``dump_logits`` does)."""
    import torch

    from dsink import engine, inference
    from dsink.data.views import TrainingSet
    from dsink.models import build_model
    from dsink.runtime import Runtime

    tp = params.baselines.ce
    index, source = corpus.index, corpus.source
    rt = Runtime(torch.device("cuda" if torch.cuda.is_available() else "cpu"))

    def fit_predict(train_rows: np.ndarray, held_rows: np.ndarray, fold: int) -> np.ndarray:
        data = TrainingSet(
            source.train,
            index.sample_id[train_rows],
            torch.from_numpy(index.noisy_label[train_rows].astype(np.int64)),
            source.name,
            source.image_size,
        )
        torch.manual_seed(seed)
        model = build_model(tp.model, index.num_classes, source.channels)
        result = engine.train(
            model, _CrossEntropy(), data, corpus.normalizer, tp, seed, rt, desc=f"ce fold {fold + 1}"
        )
        return inference.predict_logits(
            result.model,
            source.train,
            index.sample_id[held_rows],
            corpus.normalizer,
            rt.device,
            params.dump.batch_size,
            desc=f"ce fold {fold + 1} held-out",
        )

    return fit_predict


def _save_npz(path: Path, **arrays: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    os.replace(tmp, path)


def oof_ce_logits(
    corpus: Any,
    params: Any,
    corrupted_path: Path,
    k: int,
    seed: int,
    cache_dir: Path,
    fit_predict: FitPredict | None = None,
) -> dict[str, Any]:
    """Out-of-fold plain-CE logits of every training row (cached; see the module docstring)."""
    from dsink.cross_fit import assign_folds
    from dsink.params import to_dict
    from dsink.runs import fingerprint

    data = to_dict(params.data)
    config = {
        "bench": CACHE_VERSION,
        "baselines.ce": to_dict(params.baselines.ce),
        "seed": seed,
        "folds": k,
        "data": {key: data[key] for key in ("dataset", "image_size", "synthetic")},
    }
    fp = fingerprint(config, [corrupted_path])
    final = cache_dir / f"oof_ce_{fp}.npz"
    index = corpus.index
    folds = assign_folds(index.noisy_label, k, seed)
    if final.is_file():
        with np.load(final) as z:
            cached = {name: z[name] for name in z.files}
        if np.array_equal(cached["sample_id"], index.sample_id) and np.array_equal(cached["fold"], folds):
            return {**cached, "cached": True, "cache_file": str(final), "fingerprint": fp}
        say(f"{final}: does not match the corrupted set; training again")

    def part(f: int) -> Path:
        return cache_dir / f"oof_ce_{fp}.fold{f}.npz"

    def done(f: int) -> np.ndarray | None:
        if not part(f).is_file():
            return None
        with np.load(part(f)) as z:
            if not np.array_equal(z["sample_id"], index.sample_id[folds == f]):
                return None
            say(f"ce fold {f + 1}/{k}: reusing {part(f)}")
            return z["logits"]

    fold_seconds: dict[int, float] = {}

    def keep(f: int, z: np.ndarray, seconds: float) -> None:
        fold_seconds[f] = seconds
        _save_npz(part(f), logits=z, sample_id=index.sample_id[folds == f], seconds=seconds)
        say(f"ce fold {f + 1}/{k}: {seconds:.1f} s")

    if fit_predict is None:
        fit_predict = ce_fit_predict(corpus, params, seed)
    start = time.perf_counter()
    logits, _ = out_of_fold(folds, fit_predict, done, keep)
    wall = time.perf_counter() - start
    seconds = []
    for f in range(k):  # a fold reused from an interrupted run keeps the time it took then
        if f not in fold_seconds:
            with np.load(part(f)) as z:
                fold_seconds[f] = float(z["seconds"])
        seconds.append(fold_seconds[f])
    result = {
        "logits": logits.astype(np.float32),
        "fold": folds,
        "sample_id": index.sample_id,
        "fold_seconds": np.asarray(seconds),
        "wall_seconds": np.asarray(wall),
    }
    _save_npz(final, **result)
    for f in range(k):
        part(f).unlink(missing_ok=True)
    return {**result, "cached": False, "cache_file": str(final), "fingerprint": fp}


# --------------------------------------------------------------------------------------- detectors


def softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def cleanlab_detector(labels: np.ndarray, pred_probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cleanlab's flags (``find_label_issues`` with its default ``filter_by``) and score
    (1 - ``get_label_quality_scores``, self-confidence by default). ``n_jobs=1`` only turns off
    cleanlab's process pool (a shared machine); it does not change which samples are flagged."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    is_issue = find_label_issues(labels, pred_probs, n_jobs=1)
    score = 1.0 - get_label_quality_scores(labels, pred_probs)
    return np.asarray(is_issue, dtype=bool), np.asarray(score, dtype=np.float64)


def read_dsink_issues(path: Path, index: Any) -> tuple[np.ndarray, np.ndarray]:
    """``is_issue`` and ``issue_score`` of a label_issues Parquet, in corrupted-index order."""
    import pyarrow.parquet as pq

    from dsink.errors import DsinkError

    table = pq.read_table(path, columns=["sample_id", "given_label", "is_issue", "issue_score"])
    sid = table.column("sample_id").to_numpy().astype(np.int64)
    order = np.argsort(sid, kind="stable")
    if sid.size != index.sample_id.size or not np.array_equal(sid[order], np.sort(index.sample_id)):
        raise DsinkError(
            f"{path}: sample ids differ from the corrupted set's; rerun `dvc repro label_issues`"
        )
    rows = order[np.searchsorted(sid[order], index.sample_id)]
    given = table.column("given_label").to_numpy()[rows]
    if not np.array_equal(given, index.noisy_label):
        raise DsinkError(
            f"{path}: given labels differ from the corrupted set's; rerun `dvc repro label_issues`"
        )
    is_issue = table.column("is_issue").to_numpy(zero_copy_only=False)[rows].astype(bool)
    return is_issue, table.column("issue_score").to_numpy()[rows].astype(np.float64)


# --------------------------------------------------------------------------------------- one workspace


def workspace_params(workspace: Path, repo: Path) -> Any:
    """The workspace's params; a relative ``data.root`` is read against the workspace, else the repo."""
    from dsink.params import load_params

    params = load_params(workspace / "params.yaml")
    root = Path(params.data.root)
    if not root.is_absolute():
        found = next((b / root for b in (workspace, repo) if (b / root).exists()), workspace / root)
        params = dataclasses.replace(params, data=dataclasses.replace(params.data, root=str(found)))
    return params


def compare(
    workspace: Path,
    *,
    folds: int,
    seed: int | None = None,
    cache_dir: Path | None = None,
    repo: Path = ROOT,
    fit_predict: FitPredict | None = None,
) -> dict[str, Any]:
    """Every detector scored on one finished workspace (the JSON the command writes)."""
    import cleanlab

    from dsink.artifacts import read_logits
    from dsink.errors import DsinkError
    from dsink.evaluation import balanced_predictions, class_groups
    from dsink.label_issue_metrics import grouped_detection_scores, has_ground_truth
    from dsink.runs import open_corpus

    workspace = Path(workspace)
    for rel in ("params.yaml", CORRUPTED, IMBALANCE, ISSUES):
        if not (workspace / rel).is_file():
            raise DsinkError(f"{workspace / rel}: not found; run the pipeline first (`dvc repro`)")
    params = workspace_params(workspace, repo)
    corpus = open_corpus(params, workspace / CORRUPTED)
    index = corpus.index
    if not has_ground_truth(index.meta):
        raise DsinkError(
            f"{workspace / CORRUPTED}: no injected noise (data.noise.type none): nothing to score"
        )
    seed = params.seed if seed is None else seed
    cache_dir = Path(cache_dir) if cache_dir is not None else workspace / ".dsink" / "bench"
    ep = params.evaluate
    groups = class_groups(index.clean_counts(), ep.many_threshold, ep.few_threshold)
    labels = index.noisy_label.astype(np.int64)
    truth = index.is_noisy.astype(bool)

    # the files that need no training first, so a stale workspace fails before the k-fold training
    dsink_flags = read_dsink_issues(workspace / ISSUES, index)
    t_l = read_logits(workspace / IMBALANCE, index)
    p_imb = softmax(balanced_predictions(t_l, index, str(workspace / IMBALANCE)).train)
    imb_folds = int(t_l.meta.get("folds", 1) or 1)
    imb_kind = f"out-of-fold, {imb_folds} folds" if imb_folds > 1 else "in-sample"
    oof = oof_ce_logits(corpus, params, workspace / CORRUPTED, folds, seed, cache_dir, fit_predict)
    p_ce = softmax(oof["logits"])

    flags: dict[str, tuple[np.ndarray, np.ndarray]] = {
        "dsink": dsink_flags,
        "cleanlab_ce_cv": cleanlab_detector(labels, p_ce),
        "cleanlab_imb": cleanlab_detector(labels, p_imb),
        "ce_cv_disagrees": (
            p_ce.argmax(axis=1) != labels,
            1.0 - p_ce[np.arange(labels.size), labels],
        ),
    }
    sources = {
        "dsink": f"{ISSUES}: is_issue, issue_score",
        "cleanlab_ce_cv": f"{folds}-fold out-of-sample plain CE (baselines.ce), cleanlab defaults",
        "cleanlab_imb": f"{IMBALANCE} balanced-space softmax ({imb_kind}), cleanlab defaults",
        "ce_cv_disagrees": f"{folds}-fold out-of-sample plain CE (baselines.ce): argmax != label",
    }
    detectors = {}
    for key, label in DETECTORS:
        is_issue, score = flags[key]
        detectors[key] = {
            "label": label,
            "from": sources[key],
            "in_sample": key == "cleanlab_imb",
            **grouped_detection_scores(is_issue, score, truth, labels, groups),
        }
    tp = params.baselines.ce
    pred = p_ce.argmax(axis=1)
    fold_sizes = np.bincount(oof["fold"], minlength=folds)
    return {
        "workspace": str(workspace),
        "dataset": index.dataset,
        "num_samples": int(labels.size),
        "num_classes": index.num_classes,
        "noise": index.meta.get("noise"),
        "imbalance": index.meta.get("imbalance"),
        "realised_noise_rate": float(truth.mean()),
        "seed": params.seed,
        "groups": {g: [int(c) for c in groups[g]] for g in GROUPS},
        "group_sizes": {g: int(np.isin(labels, groups[g]).sum()) for g in GROUPS},
        "evaluate": {"many_threshold": ep.many_threshold, "few_threshold": ep.few_threshold},
        "cleanlab_version": cleanlab.__version__,
        "ce_kfold": {
            "folds": folds,
            "fold_seed": seed,
            "fold_sizes": fold_sizes.tolist(),
            "stratified_by": "given label",
            "model": tp.model,
            "epochs": tp.epochs,
            "batch_size": tp.batch_size,
            "lr": tp.lr,
            "schedule": tp.schedule,
            "bf16": tp.bf16,
            "channels_last": tp.channels_last,
            "fold_seconds": [float(s) for s in oof["fold_seconds"]],
            "train_seconds": float(np.sum(oof["fold_seconds"])),
            "cached": bool(oof["cached"]),
            "cache_file": oof["cache_file"],
            "accuracy_vs_given_label": float((pred == labels).mean()),
            "accuracy_vs_clean_label": float((pred == index.clean_label).mean()),
        },
        "detectors": detectors,
        "notes": [
            "cleanlab_imb reads in-sample probabilities (the imbalance teacher trained on these labels); "
            "cleanlab's documentation asks for out-of-sample ones.",
            "cleanlab_ce_cv and ce_cv_disagrees share one score (1 - p[given] of the same out-of-sample "
            "probabilities), hence one AUROC; they differ in which samples they flag.",
            "groups: samples grouped by their given label; classes grouped by their clean training count.",
        ],
    }


def _f(v: Any, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def markdown(res: dict[str, Any]) -> str:
    noise = res.get("noise") or {}
    kf = res["ce_kfold"]
    timing = "cached" if kf["cached"] else "trained now"
    lines = [
        f"{res['dataset']}, {res['num_samples']} training labels, noise {noise.get('type')} "
        f"{noise.get('rate')} (realised {res['realised_noise_rate']:.3f}); groups by given label: "
        + ", ".join(f"{g} {res['group_sizes'][g]}" for g in GROUPS),
        f"k-fold plain CE: {kf['folds']} folds x {kf['epochs']} epoch(s) ({kf['model']}): "
        f"{kf['train_seconds']:.0f} s of training ({timing}); out-of-sample accuracy "
        f"{kf['accuracy_vs_clean_label']:.3f} vs the clean label, {kf['accuracy_vs_given_label']:.3f} "
        "vs the given one",
        "",
        "| detector | flagged | precision | recall | F1 | AUROC |",
        "|---|---|---|---|---|---|",
    ]
    for key, label in DETECTORS:
        o = res["detectors"][key]["overall"]
        lines.append(
            f"| {label} | {o['num_flagged']} / {o['num_noisy']} noisy | {_f(o['precision'])} | "
            f"{_f(o['recall'])} | {_f(o['f1'])} | {_f(o['auroc'])} |"
        )
    lines += [
        "",
        "Per group (precision / recall / F1 / AUROC):",
        "",
        "| detector | " + " | ".join(GROUPS) + " |",
        "|---|" + "---|" * len(GROUPS),
    ]
    for key, label in DETECTORS:
        cells = []
        for g in GROUPS:
            s = res["detectors"][key][g]
            cells.append(" / ".join(_f(s[m]) for m in ("precision", "recall", "f1", "auroc")))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)


# --------------------------------------------------------------------------------- DVC experiments


def grid_names(
    ratios: list[int], noises: list[str], seeds: list[int], regime: str = "short", tag: str | None = None
) -> list[tuple[str, int, tuple, int]]:
    """``(experiment name, ratio, setting, seed)`` of every cell, named as bench/accuracy.py names them."""
    import accuracy

    prefix = accuracy.regime_prefix(accuracy.REGIMES[regime], tag)
    cells = []
    for ratio in ratios:
        for noise in noises:
            for seed in seeds:
                name = accuracy.exp_name(ratio, noise, seed, prefix)
                cells.append((name, ratio, accuracy.ALL_SETTINGS[noise], seed))
    return cells


def find_experiments(repo: Path) -> dict[str, str]:
    """Experiment name -> commit of every finished DVC experiment of ``repo`` (bench/accuracy.py's)."""
    import accuracy

    return accuracy.find_experiments(repo)


def materialise(repo: Path, rev: str, dest: Path) -> tuple[Path, bool]:
    """The params and pipeline outputs of commit ``rev`` (an experiment) copied into ``dest``, read from
    git and the DVC cache. Returns ``dest`` and whether data/label_issues.parquet had to be computed
    (the experiment predates the `label_issues` stage)."""
    import dvc.api
    import yaml

    dest.mkdir(parents=True, exist_ok=True)
    text = subprocess.run(
        ["git", "show", f"{rev}:params.yaml"], cwd=repo, check=True, capture_output=True, text=True
    ).stdout
    params = yaml.safe_load(text)
    root = Path(params["data"]["root"])
    if not root.is_absolute():  # the copy has no data/raw: point at the repo's
        params["data"]["root"] = str((repo / root).resolve())
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    missing = []
    for rel in (CORRUPTED, VAL, IMBALANCE, NOISE, STUDENT, ISSUES):
        target = dest / rel
        if target.is_file():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        try:
            with dvc.api.open(str(rel), repo=str(repo), rev=rev, mode="rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
        except Exception as exc:  # an output the experiment does not have
            tmp.unlink(missing_ok=True)
            missing.append((rel, exc))
            continue
        os.replace(tmp, target)
    if [rel for rel, _ in missing if rel != ISSUES]:
        rel, exc = next((r, e) for r, e in missing if r != ISSUES)
        raise RuntimeError(f"experiment {rev[:8]}: cannot read {rel} ({type(exc).__name__}: {exc})")
    recomputed = False
    if not (dest / ISSUES).is_file():
        say(f"{rev[:8]}: no {ISSUES} in the experiment; computing it with stages/label_issues.py")
        compute_issues(dest)
        recomputed = True
    return dest, recomputed


def with_student(workspace: Path, variant_dir: Path, dest: Path) -> Path:
    """A copy of ``workspace`` whose student is the one `bench/distill_variants.py` retrained in
    ``variant_dir`` (its params.yaml and logits, on the same teachers), with data/label_issues.parquet
    computed afresh from that student by the stage script."""
    import yaml

    if not (dest / ISSUES).is_file():
        for rel in (CORRUPTED, VAL, IMBALANCE, NOISE):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(workspace / rel, dest / rel)
        (dest / STUDENT).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(variant_dir / "logits.parquet", dest / STUDENT)
        params = yaml.safe_load((variant_dir / "params.yaml").read_text())
        params["data"]["root"] = yaml.safe_load((workspace / "params.yaml").read_text())["data"]["root"]
        (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        compute_issues(dest)
    return dest


def compute_issues(dest: Path) -> None:
    """data/label_issues.parquet of the workspace ``dest``, by the project's `label_issues` stage script."""
    cmd = [
        sys.executable, str(ROOT / "stages" / "label_issues.py"), "--params", str(dest / "params.yaml"),
        "--corrupted", str(dest / CORRUPTED), "--val", str(dest / VAL),
        "--imbalance-logits", str(dest / IMBALANCE), "--noise-logits", str(dest / NOISE),
        "--student-logits", str(dest / STUDENT), "--out", str(dest / ISSUES),
        "--csv", str(dest / "data" / "label_issues.csv"),
        "--metrics", str(dest / "metrics" / "label_issues.json"),
    ]  # fmt: skip
    subprocess.run(cmd, check=True, cwd=ROOT, env=dict(os.environ, TQDM_DISABLE="1"))


def queue_missing(
    repo: Path, cells: list[tuple[str, int, tuple, int]], regime: str, epochs: int | None, fp32: bool
) -> None:
    import accuracy

    root = str((repo / "data/raw").resolve())
    for name, ratio, setting, seed in cells:
        sets = accuracy.overrides(ratio, setting, seed, accuracy.REGIMES[regime], root, epochs, not fp32)
        cmd = [accuracy.DVC, "exp", "run", "--queue", "-n", name] + [a for s in sets for a in ("-S", s)]
        subprocess.run(cmd, cwd=repo, check=True, env=accuracy.worker_env(1), stdout=subprocess.DEVNULL)
        say(f"queued {name}")


def grid_markdown(results: list[dict[str, Any]]) -> str:
    cols = ("experiment", "realised noise", "detector", "flagged", "precision", "recall", "F1", "AUROC")
    lines = ["| " + " | ".join((*cols, "few F1", "few AUROC")) + " |", "|" + "---|" * (len(cols) + 2)]
    for res in results:
        for key, label in DETECTORS:
            d = res["detectors"][key]
            o, few = d["overall"], d["few"]
            lines.append(
                f"| {res['experiment']} | {res['realised_noise_rate']:.3f} | {label} | {o['num_flagged']} | "
                f"{_f(o['precision'])} | {_f(o['recall'])} | {_f(o['f1'])} | {_f(o['auroc'])} | "
                f"{_f(few['f1'])} | {_f(few['auroc'])} |"
            )
    return "\n".join(lines)


def cmd_grid(args: argparse.Namespace) -> None:
    from dsink.errors import DsinkError

    repo = Path(args.repo).resolve()
    cells = grid_names(args.ratios, args.noise, args.seeds, args.regime, args.tag)
    found = find_experiments(repo)
    missing = [c for c in cells if c[0] not in found]
    if missing:
        say("not run yet: " + ", ".join(c[0] for c in missing))
        if args.queue_missing:
            if args.tag:
                raise DsinkError(
                    "--queue-missing queues the regime's own cells; queue a variant with "
                    "bench/accuracy.py queue --tag TAG --set KEY=VALUE"
                )
            queue_missing(repo, missing, args.regime, args.epochs, args.fp32)
            say("run them: python bench/accuracy.py start --jobs 2 --wait; then this command again")
    variant_dirs = None
    if args.student_variant:
        path, vname = args.student_variant
        rows = [r for r in json.loads(Path(path).read_text())["rows"] if r["variant"] == vname]
        variant_dirs = {e: c["dir"] for r in rows for e, c in r["cells"].items() if c.get("dir")}
        if not variant_dirs:
            raise DsinkError(f"{path}: no students of variant {vname!r} (rerun bench/distill_variants.py)")
    results = []
    for name, ratio, setting, _seed in cells:
        if name not in found:
            continue
        rev = found[name]
        say(f"{name} ({rev[:8]})")
        ws, recomputed = materialise(repo, rev, repo / ".dsink" / "bench" / "exps" / f"{name}-{rev[:8]}")
        if variant_dirs is not None:
            if name not in variant_dirs:
                say(f"{name}: no student of variant {args.student_variant[1]!r}; left out")
                continue
            ws = with_student(
                ws, Path(variant_dirs[name]), ws.with_name(f"{ws.name}-{args.student_variant[1]}")
            )
        res = compare(ws, folds=args.folds, seed=args.seed, cache_dir=repo / ".dsink" / "bench", repo=repo)
        res.update(
            experiment=name,
            rev=rev,
            ratio=ratio,
            noise_setting=setting[0],
            label_issues_recomputed=recomputed,
        )
        results.append(res)
    text = grid_markdown(results)
    print(text)
    payload = {
        "command": "python bench/label_issues.py " + " ".join(args.argv),
        "cells": [c[0] for c in cells],
        "missing": [c[0] for c in missing],
        "results": results,
    }
    out = Path(args.out or ROOT / "bench/results/label_issues_grid.json")
    write_json(out, payload)
    say(f"{len(results)} of {len(cells)} experiments -> {out}")


def cmd_workspace(args: argparse.Namespace) -> None:
    res = compare(Path(args.workspace).resolve(), folds=args.folds, seed=args.seed, repo=ROOT)
    res["command"] = "python bench/label_issues.py " + " ".join(args.argv)
    print(markdown(res))
    out = Path(args.out or ROOT / "bench/results/label_issues.json")
    write_json(out, res)
    say(f"-> {out}")


def main(argv: list[str] | None = None) -> None:
    import accuracy

    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workspace", default=str(ROOT), help="finished pipeline workspace (default: the repo)")
    p.add_argument(
        "--folds", type=int, default=5, help="k of the k-fold CE (default %(default)s, cleanlab's)"
    )
    p.add_argument("--seed", type=int, default=None, help="fold and model seed (default: the run's seed)")
    p.add_argument("--out", default=None, help="JSON (default bench/results/label_issues[_grid].json)")
    g = p.add_argument_group("grid over DVC experiments of bench/accuracy.py")
    g.add_argument(
        "--grid", action="store_true", help="run over the experiments <prefix>-r<ratio>-<noise>-s<seed>"
    )
    g.add_argument("--repo", default=str(ROOT), help="repository holding the experiments (default: this one)")
    g.add_argument("--ratios", type=int, nargs="+", default=[100, 10], help="imbalance ratios")
    g.add_argument(
        "--noise", nargs="+", default=["sym0.4", "asym0.4", "imb0.4"], choices=sorted(accuracy.ALL_SETTINGS)
    )
    g.add_argument(
        "--regime",
        default="short",
        choices=sorted(accuracy.REGIMES),
        help="which grid's experiments (bench/accuracy.py): short (acc-...) or memorising (mem-...)",
    )
    g.add_argument("--tag", default=None, help="a variant's experiments (bench/accuracy.py queue --tag)")
    g.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds (data and models)")
    g.add_argument("--queue-missing", action="store_true", help="queue the cells with no experiment yet")
    g.add_argument(
        "--student-variant",
        nargs=2,
        metavar=("JSON", "NAME"),
        default=None,
        help="D-SINK's student retrained by bench/distill_variants.py (its JSON, variant NAME) in place of "
        "each experiment's; label issues recomputed from it",
    )
    g.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="--queue-missing: epochs of every model (default: the regime's)",
    )
    g.add_argument(
        "--fp32", action="store_true", help="--queue-missing: float32 (default bf16 + channels_last)"
    )
    args = p.parse_args(argv)
    args.argv = argv
    from dsink.errors import DsinkError

    try:
        import cleanlab  # noqa: F401
    except ImportError:
        p.exit(2, f"{p.prog}: error: cleanlab is not installed; pip install -e '.[bench]'\n")
    try:
        (cmd_grid if args.grid else cmd_workspace)(args)
    except DsinkError as exc:
        p.exit(2, f"{p.prog}: error: {exc}\n")


if __name__ == "__main__":
    main()
