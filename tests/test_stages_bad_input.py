"""Every training-side stage fed bad input: exit code 2, one line on stderr naming the file, no output.

Stage entry points run in-process (``cli(argv)``), with artifacts made by hand, so no training is
needed to reach each check.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dsink.artifacts import logits_table, read_corrupted, write_logits

ROOT = Path(__file__).resolve().parents[1]
C = 3


def load_stage(name: str):
    spec = importlib.util.spec_from_file_location(f"stage_{name}", ROOT / "stages" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture()
def work(tmp_path, monkeypatch):
    """A tmp working dir with synthetic params and a corrupted index."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(dataset="synthetic", root=str(tmp_path / "raw"))
    params["data"]["imbalance"]["ratio"] = 4
    params["data"]["synthetic"].update(num_classes=C, image_size=8, train_per_class=40, test_per_class=10)
    params["data"]["validation"]["per_class"] = 4
    for sec in (params["teachers"]["imbalance"], params["teachers"]["noise"], params["distill"]):
        sec.update(epochs=1, batch_size=16, track_every=0, model="small_cnn")
    for sec in (params["teachers"]["imbalance"], params["teachers"]["noise"]):
        sec.update(folds=1)  # the files these tests hand-make are single models (fold files: test_cross_fit)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    load_stage("corrupt").cli([])
    return tmp_path


def good_logits(path: Path, role: str, width: int = C, **edit) -> None:
    idx = read_corrupted("data/corrupted/train.parquet")
    n_tr, n_te = idx.sample_id.size, 10 * C
    z = np.random.default_rng(0).normal(size=(n_tr + n_te, width)).astype(np.float32)
    ids = np.concatenate([idx.sample_id, np.arange(n_te)])
    split = np.array(["train"] * n_tr + ["test"] * n_te, dtype=object)
    meta = {"role": role, "method": "x", "dataset": "synthetic", "num_classes": width}
    if "nan" in edit:
        z[5, 0] = np.nan
    if "dup" in edit:
        ids[1] = ids[0]
    if "meta" in edit:
        meta.update(edit["meta"])
    write_logits(path, logits_table(split, ids, z, meta))


def run_stage(name: str, argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        load_stage(name).cli(argv)
    return exc.value.code, capsys.readouterr().err


def assert_clean_failure(code: int, err: str, must: str, outputs: list[Path]) -> None:
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert must in lines[0], lines[0]
    assert "Traceback" not in err
    for out in outputs:
        assert not out.exists(), out
        leftovers = list(out.parent.glob(f".{out.name}*")) if out.parent.exists() else []
        assert not leftovers, leftovers


def test_train_teacher_without_corrupted_set(work, capsys):
    os.remove("data/corrupted/train.parquet")
    code, err = run_stage("train_teacher", ["--role", "noise"], capsys)
    assert_clean_failure(code, err, "train.parquet", [work / "data/teachers/noise/model.pt"])


def test_train_teacher_on_garbage_corrupted_set(work, capsys):
    Path("data/corrupted/train.parquet").write_bytes(b"garbage")
    code, err = run_stage("train_teacher", ["--role", "imbalance"], capsys)
    assert_clean_failure(code, err, "not a readable Parquet", [work / "data/teachers/imbalance/model.pt"])


def test_unknown_params_key_names_the_closest(work, capsys):
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["teachers"]["noise"]["epoch"] = 3
    Path("params.yaml").write_text(yaml.safe_dump(params))
    code, err = run_stage("train_teacher", ["--role", "noise"], capsys)
    assert_clean_failure(code, err, "teachers.noise.epochs", [work / "data/teachers/noise/model.pt"])


class Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_dump_refuses_a_malicious_model_file(work, capsys):
    Path("data/teachers/noise").mkdir(parents=True)
    torch.save({"weight": Evil()}, "data/teachers/noise/model.pt")
    code, err = run_stage("dump_logits", ["--role", "noise"], capsys)
    assert_clean_failure(code, err, "refused to load", [work / "data/logits/noise.parquet"])
    assert not Path("pwned").exists()


def test_dump_rejects_a_model_of_another_shape(work, capsys):
    from dsink.checkpoints import save_state_dict
    from dsink.models import build_model

    save_state_dict(build_model("small_cnn", C + 2, 1), "data/teachers/noise/model.pt")
    code, err = run_stage("dump_logits", ["--role", "noise"], capsys)
    assert_clean_failure(code, err, "does not fit", [work / "data/logits/noise.parquet"])


@pytest.mark.parametrize(
    ("case", "must"),
    [
        ("nan", "non-finite"),
        ("dup", "duplicate train sample_id"),
        ("width", "width is 4"),
        ("missing", "imbalance.parquet: file not found"),
        ("dataset", "dataset 'cifar10'"),
    ],
)
def test_distill_rejects_bad_teacher_logits(work, capsys, case, must):
    Path("data/logits").mkdir(parents=True, exist_ok=True)
    good_logits(Path("data/logits/noise.parquet"), "noise")
    if case == "nan":
        good_logits(Path("data/logits/imbalance.parquet"), "imbalance", nan=True)
    elif case == "dup":
        good_logits(Path("data/logits/imbalance.parquet"), "imbalance", dup=True)
    elif case == "width":
        good_logits(Path("data/logits/imbalance.parquet"), "imbalance", width=C + 1)
    elif case == "dataset":
        good_logits(Path("data/logits/imbalance.parquet"), "imbalance", meta={"dataset": "cifar10"})
    code, err = run_stage("distill", [], capsys)
    outs = [work / "data/student/model.pt", work / "data/student/logits.parquet"]
    assert_clean_failure(code, err, must, outs)


def test_evaluate_without_student_logits(work, capsys):
    Path("data/logits").mkdir(parents=True, exist_ok=True)
    good_logits(Path("data/logits/noise.parquet"), "noise")
    good_logits(Path("data/logits/imbalance.parquet"), "imbalance")
    code, err = run_stage("evaluate", [], capsys)
    assert_clean_failure(code, err, "data/student/logits.parquet", [work / "metrics/evaluate.json"])


@pytest.mark.parametrize("missing", ["ce", "la_small_loss"])
def test_evaluate_without_a_baseline(work, capsys, missing):
    for path, role in (
        ("data/logits/noise.parquet", "noise"),
        ("data/logits/imbalance.parquet", "imbalance"),
        ("data/student/logits.parquet", "student"),
        ("data/baselines/ce/logits.parquet", "baseline_ce"),
        ("data/baselines/la_small_loss/logits.parquet", "baseline_la_small_loss"),
    ):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        good_logits(Path(path), role)
    os.remove(f"data/baselines/{missing}/logits.parquet")
    code, err = run_stage("evaluate", [], capsys)
    assert_clean_failure(
        code, err, f"data/baselines/{missing}/logits.parquet", [work / "metrics/evaluate.json"]
    )


def test_train_baseline_without_corrupted_set(work, capsys):
    os.remove("data/corrupted/train.parquet")
    code, err = run_stage("train_baseline", ["--method", "ce"], capsys)
    outs = [work / "data/baselines/ce/model.pt", work / "data/baselines/ce/logits.parquet"]
    assert_clean_failure(code, err, "data/corrupted/train.parquet", outs)


def test_debug_shows_the_traceback(work, capsys):
    os.remove("data/corrupted/train.parquet")
    code, err = run_stage("train_teacher", ["--role", "noise", "--debug"], capsys)
    assert code == 2 and "Traceback" in err


def test_truncated_dataset_files_are_one_line(tmp_path, monkeypatch, capsys):
    raw = tmp_path / "raw" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ):
        # a valid IDX header promising 60000 images, then the file stops
        (raw / name).write_bytes(
            bytes([0, 0, 8, 3]) + (60000).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + b"\x00" * 100
        )
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"]["root"] = str(tmp_path / "raw")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    code, err = run_stage("corrupt", [], capsys)
    assert_clean_failure(code, err, "could not be read", [tmp_path / "data/corrupted/train.parquet"])
