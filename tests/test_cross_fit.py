"""Cross-fitted teachers (``teachers.<role>.folds: k >= 2``): the stratified fold assignment, fold models
that never see their held-out rows, out-of-fold training logits and averaged test logits (checked
against the fold models loaded back from the model file), the resume of a killed run, the model file's
checks, and ``folds: 1`` left exactly as the one-model path."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from dsink import checkpoints, engine, fitting, inference, runtime
from dsink import teacher_training as tt
from dsink.artifacts import read_corrupted, read_logits
from dsink.cross_fit import assign_folds, fold_seed, is_fold_bundle, save_fold_models, training_rows
from dsink.data.views import epoch_order, iterate
from dsink.dump import load_model, model_logits
from dsink.errors import DsinkError
from dsink.models import build_model
from dsink.params import load_params
from dsink.runs import open_corpus
from dsink.teachers import recipe_for

ROOT = Path(__file__).resolve().parents[1]
CORRUPTED = "data/corrupted/train.parquet"

# ------------------------------------------------------------------------------------ fold assignment


def test_folds_are_a_stratified_deterministic_partition():
    rng = np.random.default_rng(0)
    labels = np.concatenate([np.full(n, c) for c, n in enumerate([50, 23, 7, 2, 1])])
    labels = labels[rng.permutation(labels.size)]
    for k in (2, 3, 5):
        fold = assign_folds(labels, k, seed=3)
        assert fold.shape == labels.shape and fold.dtype == np.int64
        assert set(np.unique(fold)) == set(range(k))  # every row in exactly one fold, every fold used
        sizes = np.bincount(fold, minlength=k)
        assert sizes.max() - sizes.min() <= 1
        for c in np.unique(labels):
            per_fold = np.bincount(fold[labels == c], minlength=k)
            assert per_fold.max() - per_fold.min() <= 1  # stratified; a tiny class: distinct folds
        held = np.sort(np.concatenate([np.flatnonzero(fold == j) for j in range(k)]))
        np.testing.assert_array_equal(held, np.arange(labels.size))
        for j in range(k):  # model j trains on exactly the rows outside fold j
            np.testing.assert_array_equal(training_rows(fold, j), np.flatnonzero(fold != j))
        np.testing.assert_array_equal(fold, assign_folds(labels.copy(), k, seed=3))
        assert not np.array_equal(fold, assign_folds(labels, k, seed=4))
    two = np.flatnonzero(labels == 3)  # 2 samples, k = 5: different folds
    assert len(set(assign_folds(labels, 5, seed=3)[two])) == 2
    assert len({fold_seed(0, j) for j in range(5)}) == 5 and fold_seed(0, 1) == fold_seed(0, 1)
    with pytest.raises(ValueError, match="k >= 2"):
        assign_folds(labels, 1, seed=0)
    with pytest.raises(DsinkError, match="cannot be split"):
        assign_folds(np.zeros(2, dtype=np.int64), 3, seed=0)


# ---------------------------------------------------------------------------------------- stage level


def _load_stage(name: str):
    spec = importlib.util.spec_from_file_location(f"stage_{name}", ROOT / "stages" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _setup(d: Path, write_params, **extra) -> Path:
    overrides = {
        "train.model": "small_cnn",  # the oracle and the hand-made files below build this backbone
        "data.dataset": "synthetic",
        "data.root": str(d / "raw"),
        "data.imbalance.ratio": 4,
        "data.noise.rate": 0.3,
        "data.synthetic.num_classes": 3,
        "data.synthetic.image_size": 8,
        "data.synthetic.train_per_class": 40,
        "data.synthetic.test_per_class": 6,
        "data.validation.per_class": 3,
        "teachers.noise.method": "small_loss",
        "teachers.noise.forget_rate": None,
        "teachers.noise.estimate_epochs": 1,
        "teachers.noise.ramp_epochs": 1,
        "teachers.noise.epochs": 2,
        "teachers.noise.batch_size": 16,
        "teachers.noise.track_every": 0,
        "teachers.noise.folds": 3,
    }
    overrides.update(extra)
    write_params(d, overrides)
    cwd = os.getcwd()
    os.chdir(d)
    try:
        _load_stage("corrupt").cli([])
    finally:
        os.chdir(cwd)
    return d


class _Crash(Exception):
    pass


def _fit(d: Path, monkeypatch, crash_fold: int | None = None) -> list[dict]:
    """fit_teacher for the noise role in ``d``; ``crash_fold``: that fold model is killed at the start of
    its second epoch. Returns, per ``train`` call, its training rows and seed."""
    calls: list[dict] = []
    estimated: list[np.ndarray | None] = []
    real_train, real_of_model = fitting.train, tt.noise_rate_of_model

    def recording_train(model, objective, data, normalizer, p, seed, rt, **kw):
        calls.append({"rows": data.rows, "ids": data.ids, "labels": data.labels, "seed": seed})
        if crash_fold is not None and len(calls) == crash_fold + 1:
            inner = kw["on_epoch_start"]

            def on_epoch_start(m, epoch):
                if epoch == 1:
                    raise _Crash
                inner(m, epoch)

            kw["on_epoch_start"] = on_epoch_start
        return real_train(model, objective, data, normalizer, p, seed, rt, **kw)

    def recording_of_model(model, corpus, mixture, rt, rows=None, *args, **kwargs):
        estimated.append(rows)
        return real_of_model(model, corpus, mixture, rt, rows, *args, **kwargs)

    monkeypatch.setattr(fitting, "train", recording_train)
    monkeypatch.setattr("dsink.selection.noise_rate_of_model", recording_of_model)
    monkeypatch.setattr(tt, "noise_rate_of_model", recording_of_model)
    monkeypatch.chdir(d)
    try:
        tt.fit_teacher(
            load_params("params.yaml"),
            "noise",
            CORRUPTED,
            "data/teachers/noise/model.pt",
            "dvclive/teacher_noise",
            "data/teachers/noise/estimate.json",
        )
    except _Crash:
        pass
    monkeypatch.undo()
    for call, rows in zip(calls, estimated, strict=False):
        call["estimated_on"] = rows
    return calls


def _dump(d: Path, monkeypatch) -> None:
    monkeypatch.chdir(d)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    _load_stage("dump_logits").cli(["--role", "noise"])
    monkeypatch.undo()


def test_fold_models_give_out_of_fold_train_logits_and_averaged_test_logits(
    tmp_path, monkeypatch, write_params
):
    d = _setup(tmp_path, write_params)
    calls = _fit(d, monkeypatch)
    monkeypatch.chdir(d)
    params = load_params("params.yaml")
    corpus = open_corpus(params, CORRUPTED)
    idx = corpus.index
    n = idx.sample_id.size

    bundle = torch.load("data/teachers/noise/model.pt", map_location="cpu", weights_only=True)
    assert is_fold_bundle(bundle) and bundle["folds"] == 3 and len(bundle["models"]) == 3
    fold = bundle["fold"].numpy()
    np.testing.assert_array_equal(fold, assign_folds(idx.noisy_label, 3, params.seed))
    np.testing.assert_array_equal(bundle["sample_id"].numpy(), idx.sample_id)

    # fold model j trained on the rows outside fold j, keeping their corrupted-index rows and labels,
    # and estimated the noise rate on those same rows; it never saw a row of fold j
    assert len(calls) == 3
    for j, call in enumerate(calls):
        np.testing.assert_array_equal(call["rows"], np.flatnonzero(fold != j))
        assert not np.isin(np.flatnonzero(fold == j), call["rows"]).any()
        np.testing.assert_array_equal(call["ids"], idx.sample_id[call["rows"]])
        np.testing.assert_array_equal(call["labels"].numpy(), idx.noisy_label[call["rows"]])
        np.testing.assert_array_equal(call["estimated_on"], call["rows"])
        assert call["seed"] == fold_seed(params.seed, j)
    est = json.loads(Path("data/teachers/noise/estimate.json").read_text())
    assert est["folds"] == 3 and len(est["noise_rate_estimate_folds"]) == 3
    per_fold = np.asarray(est["noise_rate_estimate_folds"], dtype=float)
    np.testing.assert_allclose(est["noise_rate_estimate"], per_fold.mean(axis=0))
    assert Path("dvclive/teacher_noise/plots/metrics/train_loss.tsv").is_file()
    assert Path("dvclive/teacher_noise/plots/metrics/fold_2/train_loss.tsv").is_file()
    assert not list(Path(".dsink/checkpoints").rglob("last.pt"))  # cleared once every fold is written

    _dump(d, monkeypatch)
    monkeypatch.chdir(d)
    lg = read_logits("data/logits/noise.parquet", idx, val_ids=corpus.val_ids)
    assert lg.meta["folds"] == 3 and lg.meta["role"] == "noise" and "train_offset" in lg.meta
    assert lg.meta["noise_rate_estimate"] == pytest.approx(est["noise_rate_estimate"])

    # the oracle: recompute every row from the fold models loaded back from the file
    models = []
    for state in bundle["models"]:
        m = build_model("small_cnn", idx.num_classes, corpus.source.channels)
        m.load_state_dict(state)
        models.append(m.eval())
    dev = torch.device("cpu")

    def predict(m, split, ids):
        return inference.predict_logits(m, split, ids, corpus.normalizer, dev, 7)

    train_by = [predict(m, corpus.source.train, idx.sample_id) for m in models]
    expected_train = np.stack([train_by[fold[i]][i] for i in range(n)])
    test_ids = np.arange(len(corpus.source.test))
    test_mean = np.mean([predict(m, corpus.source.test, test_ids) for m in models], axis=0)
    val_mean = np.mean([predict(m, corpus.source.train, corpus.val_ids) for m in models], axis=0)
    np.testing.assert_allclose(lg.train, expected_train, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lg.test, test_mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lg.val, val_mean, rtol=1e-5, atol=1e-5)
    # and not the in-sample logits of any one model
    assert not np.allclose(lg.train, train_by[0], atol=1e-3)


def test_a_killed_run_resumes_in_its_fold_and_gives_the_same_files(tmp_path, monkeypatch, write_params):
    ref = _setup(tmp_path / "ref", write_params)
    _fit(ref, monkeypatch)
    d = _setup(tmp_path / "crashed", write_params)
    assert len(_fit(d, monkeypatch, crash_fold=1)) == 2
    assert not (d / "data/teachers/noise/model.pt").exists()
    done = sorted(p.parent.name for p in (d / ".dsink/checkpoints").rglob("last.pt"))
    assert done == ["fold_0", "fold_1"]  # fold 0 finished, fold 1 stopped after its first epoch
    _fit(d, monkeypatch)
    for name in ("model.pt", "estimate.json"):
        assert (d / "data/teachers/noise" / name).read_bytes() == (
            ref / "data/teachers/noise" / name
        ).read_bytes()


def test_one_fold_is_the_one_model_path(tmp_path, monkeypatch, write_params):
    """``folds: 1``: a plain state dict, byte for byte the model the engine trains on every sample with
    the run's seed, and logits that are that model's (in-sample), with ``folds: 1`` in the metadata."""
    d = _setup(tmp_path, write_params, **{"teachers.noise.folds": 1})
    calls = _fit(d, monkeypatch)
    assert len(calls) == 1 and calls[0]["rows"] is None
    monkeypatch.chdir(d)
    params = load_params("params.yaml")
    tp = params.teachers.noise
    corpus = open_corpus(params, CORRUPTED)
    recipe = recipe_for("noise", tp, corpus.index)
    torch.manual_seed(params.seed)
    model = build_model(tp.model, corpus.index.num_classes, corpus.source.channels)
    rt = runtime.Runtime(torch.device("cpu"))
    from dsink.selection import estimate_hook

    result = engine.train(
        model,
        recipe.objective,
        corpus.training_set(),
        corpus.normalizer,
        tp,
        params.seed,
        rt,
        objective_state=recipe.state,
        on_epoch_start=estimate_hook(recipe.objective, corpus, tp, rt),
    )
    checkpoints.save_state_dict(result.model, "old.pt")
    assert Path("data/teachers/noise/model.pt").read_bytes() == Path("old.pt").read_bytes()
    est = json.loads(Path("data/teachers/noise/estimate.json").read_text())
    assert set(est) == {"role", "noise_rate_estimate", "noise_rate_estimate_per_class", "forget_rate"}

    _dump(d, monkeypatch)
    monkeypatch.chdir(d)
    lg = read_logits("data/logits/noise.parquet", corpus.index, val_ids=corpus.val_ids)
    old = model_logits(load_model(tp.model, "old.pt", 3, 1), corpus, params.dump.batch_size, "old")
    assert lg.meta["folds"] == 1
    np.testing.assert_array_equal(lg.train, old.train)
    np.testing.assert_array_equal(lg.test, old.test)
    np.testing.assert_array_equal(lg.val, old.val)


def test_a_subset_training_set_batches_carry_corrupted_index_rows(tmp_path, monkeypatch, write_params):
    d = _setup(tmp_path, write_params)
    monkeypatch.chdir(d)
    corpus = open_corpus(load_params("params.yaml"), CORRUPTED)
    rows = np.flatnonzero(np.arange(corpus.index.sample_id.size) % 3 != 1)
    ts = corpus.training_set(rows)
    assert len(ts) == rows.size and corpus.training_set().rows is None
    seen = []
    for b in iterate(ts, epoch_order(len(ts), 0, 0, 1, 0), np.arange(len(ts)), 10):
        r = b.rows.numpy()
        np.testing.assert_array_equal(b.labels.numpy(), corpus.index.noisy_label[r])
        assert torch.equal(b.images, corpus.source.train.load(corpus.index.sample_id[r]))
        seen.append(r)
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), rows)


@pytest.mark.parametrize(
    ("file_folds", "param_folds", "other_index", "must"),
    [
        (2, 1, False, "holds 2 cross-fitted fold models but teachers.noise.folds = 1"),
        (1, 3, False, "holds one model (a plain state dict) but teachers.noise.folds = 3"),
        (3, 2, False, "holds 3 cross-fitted fold models but teachers.noise.folds = 2"),
        (2, 2, True, "trained on another corrupted index"),
    ],
)
def test_dump_refuses_a_model_file_that_does_not_fit_the_folds(
    file_folds, param_folds, other_index, must, tmp_path, monkeypatch, write_params, capsys
):
    d = _setup(tmp_path, write_params, **{"teachers.noise.folds": param_folds})
    monkeypatch.chdir(d)
    idx = read_corrupted(CORRUPTED)
    path = "data/teachers/noise/model.pt"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if file_folds == 1:
        checkpoints.save_state_dict(build_model("small_cnn", 3, 1), path)
    else:
        states = [build_model("small_cnn", 3, 1).state_dict() for _ in range(file_folds)]
        ids = idx.sample_id[:-1] if other_index else idx.sample_id
        save_fold_models(states, assign_folds(idx.noisy_label[: ids.size], file_folds, 0), ids, path)
    with pytest.raises(SystemExit) as exc:
        _load_stage("dump_logits").cli(["--role", "noise"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and must in err and len(err.strip().splitlines()) == 1, err
    assert not Path("data/logits/noise.parquet").exists()
    if file_folds == 2:
        with pytest.raises(DsinkError, match="cross-fitted"):
            load_model("small_cnn", path, 3, 1)  # the one-model loader refuses a fold file clearly
