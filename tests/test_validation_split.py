"""The validation split: held out of the source training set before the long tail, class-balanced, seeded,
disjoint from the training ids, carried through every logits file as ``val`` rows, and refused when a class
is too small for it."""

from __future__ import annotations

import importlib.util
import json
import signal
from pathlib import Path

import numpy as np
import pytest

from dsink.artifacts import (
    CorruptedIndex,
    ValidationSplit,
    logits_table,
    read_corrupted,
    read_logits,
    read_validation,
    write_corrupted,
    write_logits,
    write_validation,
)
from dsink.corrupt import corrupt_labels, validation_split
from dsink.errors import DsinkError
from dsink.params import DataParams, from_dict

ROOT = Path(__file__).resolve().parents[1]


def data_params(**validation) -> DataParams:
    return from_dict(
        DataParams,
        {
            "dataset": "synthetic",
            "imbalance": {"profile": "exp", "ratio": 10, "head": "natural"},
            "noise": {"type": "symmetric", "rate": 0.3},
            "validation": validation,
        },
    )


def source_labels(C: int = 5, per: int = 300) -> np.ndarray:
    return np.random.default_rng(7).permutation(np.repeat(np.arange(C), per))


def test_held_out_before_the_long_tail_class_balanced_and_disjoint():
    labels = source_labels()
    names = [f"c{i}" for i in range(5)]
    p = data_params(per_class=50)
    val = validation_split(labels, 5, names, p, seed=0)
    assert np.bincount(val.label, minlength=5).tolist() == [50] * 5
    np.testing.assert_array_equal(val.label, labels[val.sample_id])
    assert np.unique(val.sample_id).size == val.sample_id.size == 250
    idx = corrupt_labels(labels, 5, names, p, 0, exclude=val.sample_id)
    assert np.intersect1d(idx.sample_id, val.sample_id).size == 0
    # n_max = 300 - 50 = 250: floor(250 * 10 ** (-c / 4)) = 250, 140, 79, 44, 25 (by hand)
    assert idx.clean_counts().tolist() == [250, 140, 79, 44, 25]
    assert idx.meta["validation"] == {"per_class": 50} and idx.meta["validation_size"] == 250


def test_no_validation_split_changes_nothing_else():
    labels = source_labels()
    names = [f"c{i}" for i in range(5)]
    val = validation_split(labels, 5, names, data_params(per_class=0), seed=3)
    assert val.sample_id.size == 0
    a = corrupt_labels(labels, 5, names, data_params(per_class=0), 3, exclude=val.sample_id)
    b = corrupt_labels(labels, 5, names, data_params(per_class=0), 3)
    np.testing.assert_array_equal(a.sample_id, b.sample_id)
    np.testing.assert_array_equal(a.noisy_label, b.noisy_label)
    assert a.clean_counts().tolist() == [300, 168, 94, 53, 30]  # the whole source, as before


def test_hold_out_is_seeded():
    labels = source_labels()
    names = [str(i) for i in range(5)]
    a = validation_split(labels, 5, names, data_params(per_class=20), seed=0)
    b = validation_split(labels, 5, names, data_params(per_class=20), seed=0)
    c = validation_split(labels, 5, names, data_params(per_class=20), seed=1)
    np.testing.assert_array_equal(a.sample_id, b.sample_id)
    assert not np.array_equal(a.sample_id, c.sample_id)


# ---------------------------------------------------------------- the corrupt stage


def _load_stage(name: str):
    spec = importlib.util.spec_from_file_location(f"stage_{name}_val_test", ROOT / "stages" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture()
def run_stage(monkeypatch, capsys):
    """``run_stage(name, workdir, argv) -> (exit code, stderr)`` in-process, ``workdir`` as cwd."""

    def run(name: str, workdir: Path, argv: list[str] | None = None) -> tuple[int, str]:
        monkeypatch.chdir(workdir)
        monkeypatch.setenv("TQDM_DISABLE", "1")
        saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        capsys.readouterr()
        try:
            _load_stage(name).cli(argv or [])
            code = 0
        except SystemExit as exc:
            code = exc.code
        finally:
            for s, h in saved.items():
                signal.signal(s, h)
        return code, capsys.readouterr().err

    return run


def synthetic_dir(tmp_path: Path, name: str, write_params, **overrides) -> Path:
    d = tmp_path / name
    base = {
        "seed": 0,
        "data.dataset": "synthetic",
        "data.root": str(tmp_path / "raw"),
        "data.imbalance.ratio": 4,
        "data.synthetic.num_classes": 3,
        "data.synthetic.image_size": 4,
        "data.synthetic.train_per_class": 40,
        "data.synthetic.test_per_class": 5,
        "data.validation.per_class": 6,
    }
    write_params(d, {**base, **overrides})
    return d


def test_stage_writes_a_seeded_validation_split(tmp_path, write_params, run_stage):
    dirs = {
        "a": synthetic_dir(tmp_path, "a", write_params),
        "b": synthetic_dir(tmp_path, "b", write_params),
        "seed1": synthetic_dir(tmp_path, "seed1", write_params, seed=1),
    }
    for d in dirs.values():
        code, err = run_stage("corrupt", d)
        assert code == 0, err
    val = Path("data/corrupted/val.parquet")
    assert (dirs["a"] / val).read_bytes() == (dirs["b"] / val).read_bytes()
    assert (dirs["a"] / val).read_bytes() != (dirs["seed1"] / val).read_bytes()
    idx = read_corrupted(dirs["a"] / "data/corrupted/train.parquet")
    v = read_validation(dirs["a"] / val, idx)  # checks disjointness from the training ids
    assert np.bincount(v.label, minlength=3).tolist() == [6, 6, 6]
    from dsink.data.sources import synthetic

    np.testing.assert_array_equal(v.label, synthetic(3, 4, 1, 40, 5).train.labels[v.sample_id])
    assert v.meta == {"dataset": "synthetic", "num_classes": 3, "per_class": 6, "seed": 0}
    assert idx.clean_counts().tolist() == [34, 17, 8]  # n_max 40 - 6 = 34; floor(34 / 2), floor(34 / 4)
    metrics = json.loads((dirs["a"] / "metrics/corrupt.json").read_text())
    assert metrics["num_val"] == 18


def _image_folder(root: Path, train_counts: dict[str, int]) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, counts in (("train", train_counts), ("test", dict.fromkeys(train_counts, 1))):
        for cls, n in counts.items():
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 256, size=(6, 6), dtype=np.uint8)
                Image.fromarray(pixels, mode="L").save(root / split / cls / f"{i}.png")


def test_image_folder_class_too_small_for_the_split(tmp_path, write_params, run_stage):
    _image_folder(tmp_path / "imgs", {"ants": 5, "bees": 2})
    d = tmp_path / "run"
    write_params(
        d,
        {"data.dataset": "image_folder", "data.root": str(tmp_path / "imgs"), "data.validation.per_class": 2},
    )
    code, err = run_stage("corrupt", d)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "data.validation.per_class = 2 is too large: class 'bees' has 2 training images" in lines[0]
    assert "at most 1" in lines[0]
    assert not (d / "data").exists() or not any((d / "data").rglob("*.parquet"))
    # one image per class fits: the rest is the long tail
    write_params(
        d,
        {"data.dataset": "image_folder", "data.root": str(tmp_path / "imgs"), "data.validation.per_class": 1},
    )
    code, err = run_stage("corrupt", d)
    assert code == 0, err
    v = read_validation(d / "data/corrupted/val.parquet")
    assert np.bincount(v.label).tolist() == [1, 1]


# ---------------------------------------------------------------- readers


def _index() -> CorruptedIndex:
    ids = np.array([1, 4, 6, 9], dtype=np.int64)
    lab = np.array([0, 1, 0, 1])
    return CorruptedIndex(ids, lab, lab, np.zeros(4, bool), {"dataset": "synthetic", "num_classes": 2})


def test_read_validation_refuses_a_training_id_and_duplicates(tmp_path):
    meta = {"dataset": "synthetic", "num_classes": 2}
    write_validation(tmp_path / "v.parquet", ValidationSplit(np.array([0, 4]), np.array([0, 1]), meta))
    with pytest.raises(DsinkError, match="sample_id 4 is also a training sample"):
        read_validation(tmp_path / "v.parquet", _index())
    write_validation(tmp_path / "v.parquet", ValidationSplit(np.array([0, 0]), np.array([0, 0]), meta))
    with pytest.raises(DsinkError, match="duplicates"):
        read_validation(tmp_path / "v.parquet")
    write_validation(tmp_path / "v.parquet", ValidationSplit(np.array([0, 2]), np.array([0, 5]), meta))
    with pytest.raises(DsinkError, match="label outside 0..1"):
        read_validation(tmp_path / "v.parquet", _index())
    write_validation(tmp_path / "v.parquet", ValidationSplit(np.array([5, 2]), np.array([1, 0]), meta))
    v = read_validation(tmp_path / "v.parquet", _index())
    assert v.sample_id.tolist() == [2, 5] and v.label.tolist() == [0, 1]  # sorted by id


def _logits_file(path: Path, val_ids: np.ndarray | None, val_z: np.ndarray | None = None) -> None:
    idx = _index()
    tr = np.arange(8, dtype=np.float32).reshape(4, 2)
    te = np.zeros((3, 2), dtype=np.float32)
    split = ["train"] * 4 + ["test"] * 3
    ids = [idx.sample_id, np.arange(3)]
    parts = [tr, te]
    if val_ids is not None:
        split += ["val"] * len(val_ids)
        ids.append(np.asarray(val_ids))
        parts.append(val_z)
    write_logits(
        path, logits_table(np.array(split, dtype=object), np.concatenate(ids), np.concatenate(parts), {})
    )


def test_read_logits_val_rows(tmp_path):
    idx = _index()
    f = tmp_path / "z.parquet"
    # val rows in the file's order 7, 2; asked for in the split's order 2, 7
    _logits_file(f, [7, 2], np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32))
    z = read_logits(f, idx, 3, val_ids=np.array([2, 7]))
    np.testing.assert_array_equal(z.val, [[0.0, 1.0], [1.0, 0.0]])
    assert read_logits(f, idx, 3).val is None  # not asked for
    with pytest.raises(DsinkError, match="val rows do not match the validation split: missing id 3"):
        read_logits(f, idx, 3, val_ids=np.array([2, 3, 7]))
    # a file made elsewhere, without val rows, is still a valid teacher
    _logits_file(f, None)
    assert read_logits(f, idx, 3, val_ids=np.array([2, 7])).val is None
    _logits_file(f, [7, 2], np.array([[np.nan, 0.0], [0.0, 1.0]], dtype=np.float32))
    with pytest.raises(DsinkError, match="non-finite"):
        read_logits(f, idx, 3)


def test_open_corpus_checks_the_split(tmp_path, write_params, run_stage):
    from dsink.params import load_params
    from dsink.runs import open_corpus

    d = synthetic_dir(tmp_path, "w", write_params)
    code, err = run_stage("corrupt", d)
    assert code == 0, err
    params = load_params(d / "params.yaml")
    corpus = open_corpus(params, d / "data/corrupted/train.parquet")
    assert corpus.val is not None and corpus.val_ids.size == 18
    val_path = d / "data/corrupted/val.parquet"
    v = read_validation(val_path)
    # stale labels (e.g. a changed dataset)
    write_validation(val_path, ValidationSplit(v.sample_id, (v.label + 1) % 3, v.meta))
    with pytest.raises(DsinkError, match="labels differ from the dataset's"):
        open_corpus(params, d / "data/corrupted/train.parquet")
    # a split of another size than the params ask for
    write_validation(val_path, ValidationSplit(v.sample_id, v.label, {**v.meta, "per_class": 5}))
    with pytest.raises(DsinkError, match="holds 5 images per class but data.validation.per_class = 6"):
        open_corpus(params, d / "data/corrupted/train.parquet")
    val_path.unlink()
    with pytest.raises(DsinkError, match="val.parquet: file not found, but data.validation.per_class = 6"):
        open_corpus(params, d / "data/corrupted/train.parquet")
    # no split asked for and none there: fine
    idx = read_corrupted(d / "data/corrupted/train.parquet")
    write_corrupted(tmp_path / "alone" / "train.parquet", idx)
    params.data.validation.per_class = 0
    assert open_corpus(params, tmp_path / "alone" / "train.parquet").val is None


def test_model_logits_cover_the_validation_split(tmp_path, write_params, run_stage):
    import torch

    from dsink.dump import model_logits, write_model_logits
    from dsink.models import build_model
    from dsink.params import load_params
    from dsink.runs import open_corpus

    d = synthetic_dir(tmp_path, "m", write_params, **{"data.synthetic.image_size": 8})
    code, err = run_stage("corrupt", d)
    assert code == 0, err
    corpus = open_corpus(load_params(d / "params.yaml"), d / "data/corrupted/train.parquet")
    torch.manual_seed(0)
    model = build_model("small_cnn", 3, 1).eval()
    z = model_logits(model, corpus, 7, "t")
    assert z.val.shape == (18, 3)
    with torch.no_grad():  # the oracle: the model on the held-out images, directly
        x = corpus.normalizer(corpus.source.train.load(corpus.val_ids), torch.device("cpu"))
        expected = model(x).numpy()
    np.testing.assert_allclose(z.val, expected, rtol=1e-5, atol=1e-5)
    write_model_logits(str(d / "z.parquet"), z, corpus, {"role": "noise"})
    back = read_logits(d / "z.parquet", corpus.index, len(corpus.source.test), val_ids=corpus.val_ids)
    np.testing.assert_array_equal(back.val, z.val)
    np.testing.assert_array_equal(back.train, z.train)
