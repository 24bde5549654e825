"""The ``corrupt`` stage on the synthetic set: contract schema, metrics, byte-stable output, and bad input.

Three runs are real subprocesses (started together, to share the torch import time): two with the same
seed, compared byte for byte, and one on a missing Fashion-MNIST. The other cases call the stage's
``cli`` in-process (same entry point, same error handling), which keeps the file fast.
"""

from __future__ import annotations

import importlib.util
import json
import math
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dsink.data.sources import synthetic

ROOT = Path(__file__).resolve().parents[1]
STAGE = ROOT / "stages" / "corrupt.py"
OUT = Path("data/corrupted/train.parquet")
METRICS = Path("metrics/corrupt.json")
C, PER_CLASS, RATIO, RATE = 5, 300, 10, 0.3
# floor(300 * 10 ** (-c / 4)) for c = 0..4, worked out by hand
EXPECTED_COUNTS = [300, 168, 94, 53, 30]
COLUMNS = {
    "sample_id": pa.int64(),
    "clean_label": pa.int64(),
    "noisy_label": pa.int64(),
    "is_noisy": pa.bool_(),
}


def synthetic_overrides(root: Path, **extra) -> dict:
    base = {
        "seed": 0,
        "data.dataset": "synthetic",
        "data.root": str(root),
        "data.download": False,
        "data.synthetic.num_classes": C,
        "data.synthetic.image_size": 4,
        "data.synthetic.channels": 1,
        "data.synthetic.train_per_class": PER_CLASS,
        "data.synthetic.test_per_class": 10,
        "data.imbalance.profile": "exp",
        "data.imbalance.ratio": RATIO,
        "data.imbalance.head": "natural",
        "data.noise.type": "symmetric",
        "data.noise.rate": RATE,
        "data.noise.include_true": False,
        "data.noise.file": None,
        "data.noise.key": None,
        "data.validation.per_class": 0,  # the expected counts above are of the whole source
    }
    base.update(extra)
    return base


def subprocess_run(workdir: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(STAGE)], cwd=workdir, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def raw_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("raw")


@pytest.fixture(scope="module")
def proc_runs(tmp_path_factory, raw_root, write_params, stage_env):
    """name -> (workdir, CompletedProcess) for the three subprocess runs."""
    dirs = {name: tmp_path_factory.mktemp(name) for name in ("seed0_a", "seed0_b", "fmnist_missing")}
    write_params(dirs["seed0_a"], synthetic_overrides(raw_root))
    write_params(dirs["seed0_b"], synthetic_overrides(raw_root))
    empty_root = tmp_path_factory.mktemp("empty_root")
    write_params(dirs["fmnist_missing"], {"data.dataset": "fashion_mnist", "data.root": str(empty_root)})
    with ThreadPoolExecutor(len(dirs)) as pool:
        futures = {name: pool.submit(subprocess_run, d, stage_env) for name, d in dirs.items()}
        return {name: (dirs[name], f.result()) for name, f in futures.items()}


def _load_stage():
    spec = importlib.util.spec_from_file_location("corrupt_stage_under_test", STAGE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture()
def run_inproc(monkeypatch, capsys):
    """``run_inproc(workdir) -> (exit code, stderr)``: the stage's ``cli([])`` with ``workdir`` as cwd."""
    cli = _load_stage().cli

    def run(workdir: Path) -> tuple[int, str]:
        monkeypatch.chdir(workdir)
        monkeypatch.setenv("TQDM_DISABLE", "1")
        saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        capsys.readouterr()
        try:
            cli([])
            code = 0
        except SystemExit as exc:
            code = exc.code
        finally:
            for s, h in saved.items():
                signal.signal(s, h)
        return code, capsys.readouterr().err

    return run


def assert_clean_failure(workdir: Path, code: int, err: str, *needles: str) -> str:
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    for out in (OUT, METRICS):
        folder = workdir / out.parent
        assert not (workdir / out).exists(), out
        leftovers = sorted(p.name for p in folder.iterdir()) if folder.exists() else []
        assert not leftovers, f"left behind in {folder}: {leftovers}"
    return lines[0]


# ---------------------------------------------------------------- a good run


def test_subprocess_run_succeeds(proc_runs):
    for name in ("seed0_a", "seed0_b"):
        workdir, res = proc_runs[name]
        assert res.returncode == 0, res.stderr
        assert (workdir / OUT).is_file() and (workdir / METRICS).is_file()


def test_parquet_has_exactly_the_contract_columns_and_dtypes(proc_runs):
    workdir, _ = proc_runs["seed0_a"]
    schema = pq.read_schema(workdir / OUT)
    assert {f.name: f.type for f in schema} == COLUMNS
    assert schema.names == list(COLUMNS)


def test_rows_are_the_long_tailed_noisy_subset(proc_runs):
    workdir, _ = proc_runs["seed0_a"]
    t = pq.read_table(workdir / OUT).to_pydict()
    ids = np.asarray(t["sample_id"])
    clean, noisy = np.asarray(t["clean_label"]), np.asarray(t["noisy_label"])
    is_noisy = np.asarray(t["is_noisy"])
    assert np.all(np.diff(ids) > 0) and ids.min() >= 0 and ids.max() < C * PER_CLASS
    # clean labels are the source's own labels at those ids (the source is rebuilt independently here)
    src = synthetic(C, 4, 1, PER_CLASS, 10)
    np.testing.assert_array_equal(clean, src.train.labels[ids])
    assert np.bincount(clean, minlength=C).tolist() == EXPECTED_COUNTS
    np.testing.assert_array_equal(is_noisy, noisy != clean)
    assert noisy.min() >= 0 and noisy.max() < C
    n = ids.size
    assert abs(is_noisy.mean() - RATE) <= 4 * math.sqrt(RATE * (1 - RATE) / n)


def test_metadata(proc_runs):
    workdir, _ = proc_runs["seed0_a"]
    schema = pq.read_schema(workdir / OUT)
    meta = json.loads(schema.metadata[b"dsink"])
    assert {"dataset", "num_classes", "class_names", "class_counts", "noise_rate"} <= set(meta)
    assert meta["dataset"] == "synthetic"
    assert meta["num_classes"] == C
    assert len(meta["class_names"]) == C and all(isinstance(s, str) for s in meta["class_names"])
    assert meta["class_counts"] == EXPECTED_COUNTS
    is_noisy = pq.read_table(workdir / OUT).column("is_noisy").to_numpy()
    assert meta["noise_rate"] == pytest.approx(is_noisy.mean(), abs=1e-12)
    # the corruption params
    assert meta["imbalance"]["profile"] == "exp" and meta["imbalance"]["ratio"] == RATIO
    assert meta["noise"]["type"] == "symmetric" and meta["noise"]["rate"] == RATE
    assert meta["seed"] == 0


def test_metrics_agree_with_the_parquet(proc_runs):
    workdir, _ = proc_runs["seed0_a"]
    metrics = json.loads((workdir / METRICS).read_text())
    t = pq.read_table(workdir / OUT)
    counts = np.bincount(t.column("clean_label").to_numpy(), minlength=C)
    assert metrics["num_samples"] == t.num_rows == sum(EXPECTED_COUNTS)
    assert metrics["noise_rate"] == pytest.approx(t.column("is_noisy").to_numpy().mean(), abs=1e-12)
    assert metrics["imbalance_ratio"] == pytest.approx(counts.max() / counts.min())
    assert metrics["imbalance_ratio"] == pytest.approx(300 / 30)


def test_same_seed_is_byte_identical_across_processes(proc_runs):
    (a, ra), (b, rb) = proc_runs["seed0_a"], proc_runs["seed0_b"]
    assert ra.returncode == rb.returncode == 0
    assert (a / OUT).read_bytes() == (b / OUT).read_bytes()
    assert (a / METRICS).read_bytes() == (b / METRICS).read_bytes()


def test_same_seed_in_process_matches_and_another_seed_differs(
    proc_runs, tmp_path, raw_root, write_params, run_inproc
):
    reference = (proc_runs["seed0_a"][0] / OUT).read_bytes()
    same, other = tmp_path / "same", tmp_path / "other"
    write_params(same, synthetic_overrides(raw_root))
    write_params(other, synthetic_overrides(raw_root, seed=1))
    assert run_inproc(same)[0] == 0
    assert run_inproc(other)[0] == 0
    assert (same / OUT).read_bytes() == reference
    assert (other / OUT).read_bytes() != reference
    ids0 = pq.read_table(same / OUT).column("sample_id").to_numpy()
    ids1 = pq.read_table(other / OUT).column("sample_id").to_numpy()
    assert not np.array_equal(ids0, ids1)


def test_noise_settings_do_not_change_the_kept_samples(tmp_path, raw_root, write_params, run_inproc):
    ids = []
    for name, extra in (("a", {}), ("b", {"data.noise.rate": 0.1}), ("c", {"data.noise.type": "none"})):
        write_params(tmp_path / name, synthetic_overrides(raw_root, **extra))
        assert run_inproc(tmp_path / name)[0] == 0
        ids.append(pq.read_table(tmp_path / name / OUT).column("sample_id").to_numpy())
    np.testing.assert_array_equal(ids[0], ids[1])
    np.testing.assert_array_equal(ids[0], ids[2])
    t = pq.read_table(tmp_path / "c" / OUT)
    assert not t.column("is_noisy").to_numpy().any()
    assert json.loads((tmp_path / "c" / METRICS).read_text())["noise_rate"] == 0.0


def test_asymmetric_records_its_pair_map(tmp_path, raw_root, write_params, run_inproc):
    write_params(tmp_path, synthetic_overrides(raw_root, **{"data.noise.type": "asymmetric"}))
    assert run_inproc(tmp_path)[0] == 0
    table = pq.read_table(tmp_path / OUT)
    pair_map = {int(k): v for k, v in json.loads(table.schema.metadata[b"dsink"])["pair_map"].items()}
    assert sorted(pair_map) == list(range(C)) and all(pair_map[k] != k for k in pair_map)
    clean = table.column("clean_label").to_numpy()
    noisy = table.column("noisy_label").to_numpy()
    flipped = noisy != clean
    assert flipped.any()
    assert all(pair_map[c] == n for c, n in zip(clean[flipped], noisy[flipped], strict=True))


def test_noise_file_is_applied_by_sample_id(tmp_path, raw_root, write_params, run_inproc):
    human = np.random.default_rng(3).integers(0, C, C * PER_CLASS)
    np.save(tmp_path / "human.npy", human)
    write_params(
        tmp_path,
        synthetic_overrides(
            raw_root, **{"data.noise.type": "file", "data.noise.file": str(tmp_path / "human.npy")}
        ),
    )
    assert run_inproc(tmp_path)[0] == 0
    t = pq.read_table(tmp_path / OUT)
    ids = t.column("sample_id").to_numpy()
    np.testing.assert_array_equal(t.column("noisy_label").to_numpy(), human[ids])
    meta = json.loads(t.schema.metadata[b"dsink"])
    assert meta["noise_rate"] == pytest.approx(np.mean(human[ids] != t.column("clean_label").to_numpy()))


# ---------------------------------------------------------------- bad input


def test_missing_fashion_mnist_says_how_to_get_it(proc_runs):
    workdir, res = proc_runs["fmnist_missing"]
    line = assert_clean_failure(workdir, res.returncode, res.stderr, "apt", "dataset-fashion-mnist")
    assert "fashion_mnist" in line


@pytest.mark.parametrize(
    "extra, needles",
    [
        ({"data.dataset": "imagenet"}, ["data.dataset", "imagenet"]),
        ({"data.noise.type": "gaussian"}, ["data.noise.type", "gaussian", "symmetric"]),
        ({"data.noise.rate": 1.0}, ["data.noise.rate", "1.0"]),
        ({"data.noise.rate": -0.1}, ["data.noise.rate", "-0.1"]),
        ({"data.imbalance.ratio": 0.5}, ["data.imbalance.ratio", "0.5"]),
        ({"data.imbalance.profile": "linear"}, ["data.imbalance.profile", "linear"]),
        ({"data.noise.type": "file", "data.noise.file": None}, ["data.noise.file"]),
        ({"data.noise.rat": 0.2}, ["data.noise.rat", "rate"]),
    ],
)
def test_bad_params(tmp_path, raw_root, write_params, run_inproc, extra, needles):
    write_params(tmp_path, synthetic_overrides(raw_root, **extra))
    code, err = run_inproc(tmp_path)
    assert_clean_failure(tmp_path, code, err, *needles)


@pytest.mark.parametrize(
    "case, needle",
    [
        ("wrong_length", "1499"),
        ("out_of_range", "outside"),
        ("missing", "not found"),
        ("float_labels", "integers"),
    ],
)
def test_bad_noise_file(tmp_path, raw_root, write_params, run_inproc, case, needle):
    path = tmp_path / "labels" / "human.npy"
    path.parent.mkdir()
    labels = np.random.default_rng(0).integers(0, C, C * PER_CLASS)
    if case == "wrong_length":
        np.save(path, labels[:-1])
    elif case == "out_of_range":
        labels[17] = C
        np.save(path, labels)
    elif case == "float_labels":
        np.save(path, labels + 0.5)
    overrides = {"data.noise.type": "file", "data.noise.file": str(path)}
    write_params(tmp_path, synthetic_overrides(raw_root, **overrides))
    code, err = run_inproc(tmp_path)
    assert_clean_failure(tmp_path, code, err, str(path), needle)
