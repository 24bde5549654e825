"""The corrupted index Parquet: round trip, byte-stable writes, malformed files rejected, atomic writes."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dsink.artifacts import CorruptedIndex, atomic_path, read_corrupted, write_corrupted
from dsink.errors import DsinkError

C = 4


def make_index(n: int = 50, seed: int = 0) -> CorruptedIndex:
    g = np.random.default_rng(seed)
    ids = np.sort(g.choice(10 * n, size=n, replace=False)).astype(np.int64)
    clean = g.integers(0, C, n)
    noisy = np.where(g.random(n) < 0.3, g.integers(0, C, n), clean)
    meta = {
        "dataset": "synthetic",
        "num_classes": C,
        "class_names": [f"c{i}" for i in range(C)],
        "class_counts": np.bincount(clean, minlength=C).tolist(),
        "noise_rate": float(np.mean(noisy != clean)),
        "noise": {"type": "symmetric", "rate": 0.3},
    }
    return CorruptedIndex(ids, clean, noisy, noisy != clean, meta)


def write_raw(path, columns: dict, meta: dict | None = None) -> None:
    """A Parquet file written by hand (any shape), with ``meta`` as the ``dsink`` schema metadata."""
    table = pa.table(columns)
    meta = {"dataset": "synthetic", "num_classes": C} if meta is None else meta
    table = table.replace_schema_metadata({b"dsink": json.dumps(meta).encode()})
    pq.write_table(table, path)


def good_columns(n: int = 6) -> dict:
    return {
        "sample_id": pa.array(np.arange(n) * 2, pa.int64()),
        "clean_label": pa.array(np.arange(n) % C, pa.int64()),
        "noisy_label": pa.array(np.arange(n) % C, pa.int64()),
        "is_noisy": pa.array(np.zeros(n, bool), pa.bool_()),
    }


def read_error(path) -> str:
    with pytest.raises(DsinkError) as exc:
        read_corrupted(path)
    msg = str(exc.value)
    assert str(path) in msg, msg
    assert "\n" not in msg, f"error spans several lines: {msg!r}"
    return msg


def test_round_trip(tmp_path):
    idx = make_index()
    path = tmp_path / "sub" / "train.parquet"
    write_corrupted(path, idx)
    back = read_corrupted(path)
    for name in ("sample_id", "clean_label", "noisy_label"):
        got = getattr(back, name)
        assert got.dtype == np.int64, name
        np.testing.assert_array_equal(got, getattr(idx, name))
    assert back.is_noisy.dtype == bool
    np.testing.assert_array_equal(back.is_noisy, idx.is_noisy)
    assert back.meta == idx.meta
    assert back.num_classes == C and back.dataset == "synthetic"
    assert back.clean_counts().tolist() == idx.meta["class_counts"]
    np.testing.assert_allclose(
        back.noisy_prior(), np.bincount(idx.noisy_label, minlength=C) / idx.noisy_label.size
    )


def test_writes_are_byte_stable(tmp_path):
    write_corrupted(tmp_path / "a.parquet", make_index(seed=3))
    write_corrupted(tmp_path / "b.parquet", make_index(seed=3))
    write_corrupted(tmp_path / "c.parquet", make_index(seed=4))
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()
    assert (tmp_path / "a.parquet").read_bytes() != (tmp_path / "c.parquet").read_bytes()


def test_a_hand_written_file_is_accepted(tmp_path):
    write_raw(tmp_path / "t.parquet", good_columns())
    idx = read_corrupted(tmp_path / "t.parquet")
    assert idx.sample_id.tolist() == [0, 2, 4, 6, 8, 10]


def test_missing_file(tmp_path):
    assert "not found" in read_error(tmp_path / "nope.parquet")


def test_empty_file(tmp_path):
    (tmp_path / "empty.parquet").write_bytes(b"")
    read_error(tmp_path / "empty.parquet")


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.99])
def test_truncated_file(tmp_path, keep):
    path = tmp_path / "t.parquet"
    write_corrupted(path, make_index(n=2000))
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    read_error(path)


def test_not_parquet(tmp_path):
    (tmp_path / "t.parquet").write_text("sample_id,clean_label\n1,2\n")
    read_error(tmp_path / "t.parquet")


@pytest.mark.parametrize("column", ["sample_id", "clean_label", "noisy_label", "is_noisy"])
def test_missing_column(tmp_path, column):
    cols = good_columns()
    del cols[column]
    write_raw(tmp_path / "t.parquet", cols)
    assert repr(column) in read_error(tmp_path / "t.parquet")


@pytest.mark.parametrize(
    "column, array",
    [
        ("clean_label", pa.array(np.arange(6) % C, pa.float64())),
        ("noisy_label", pa.array(np.arange(6) % C + 0.5, pa.float32())),
        ("sample_id", pa.array([str(i) for i in range(6)], pa.string())),
        ("is_noisy", pa.array(np.zeros(6), pa.int64())),
    ],
)
def test_wrong_dtype(tmp_path, column, array):
    cols = good_columns()
    cols[column] = array
    write_raw(tmp_path / "t.parquet", cols)
    msg = read_error(tmp_path / "t.parquet")
    assert repr(column) in msg and str(array.type) in msg


def test_duplicate_sample_ids(tmp_path):
    cols = good_columns()
    cols["sample_id"] = pa.array([0, 2, 4, 4, 8, 10], pa.int64())
    write_raw(tmp_path / "t.parquet", cols)
    assert "duplicate" in read_error(tmp_path / "t.parquet")


def test_negative_sample_id(tmp_path):
    cols = good_columns()
    cols["sample_id"] = pa.array([-1, 2, 4, 6, 8, 10], pa.int64())
    write_raw(tmp_path / "t.parquet", cols)
    assert "sample_id" in read_error(tmp_path / "t.parquet")


@pytest.mark.parametrize("column, value", [("clean_label", C), ("noisy_label", -1), ("noisy_label", 99)])
def test_labels_out_of_range(tmp_path, column, value):
    cols = good_columns()
    values = np.arange(6) % C
    values[3] = value
    cols[column] = pa.array(values, pa.int64())
    write_raw(tmp_path / "t.parquet", cols)
    msg = read_error(tmp_path / "t.parquet")
    assert column in msg and f"0..{C - 1}" in msg


@pytest.mark.parametrize("column", ["sample_id", "clean_label", "is_noisy"])
def test_null_values(tmp_path, column):
    cols = good_columns()
    values = cols[column].to_pylist()
    values[2] = None
    cols[column] = pa.array(values, cols[column].type)
    write_raw(tmp_path / "t.parquet", cols)
    assert column in read_error(tmp_path / "t.parquet")


def test_no_rows(tmp_path):
    write_raw(tmp_path / "t.parquet", good_columns(0))
    assert "no rows" in read_error(tmp_path / "t.parquet")


@pytest.mark.parametrize(
    "meta, needle",
    [
        ({"num_classes": C}, "dataset"),
        ({"dataset": "synthetic"}, "num_classes"),
        ({"dataset": "synthetic", "num_classes": "4"}, "num_classes"),
        ({"dataset": "synthetic", "num_classes": 1}, "num_classes"),
    ],
)
def test_bad_metadata(tmp_path, meta, needle):
    write_raw(tmp_path / "t.parquet", good_columns(), meta=meta)
    assert needle in read_error(tmp_path / "t.parquet")


def test_metadata_that_is_not_json(tmp_path):
    table = pa.table(good_columns()).replace_schema_metadata({b"dsink": b"{not json"})
    pq.write_table(table, tmp_path / "t.parquet")
    assert "JSON" in read_error(tmp_path / "t.parquet")


# ---------------------------------------------------------------- atomic writes


def test_atomic_path_failure_leaves_nothing(tmp_path):
    target = tmp_path / "out" / "file.bin"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(target) as tmp:
            assert tmp.parent == target.parent and tmp != target
            tmp.write_bytes(b"half written")
            raise RuntimeError("boom")
    assert not target.exists()
    assert list(target.parent.iterdir()) == []


def test_atomic_path_failure_keeps_the_previous_file(tmp_path):
    target = tmp_path / "file.bin"
    target.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"new")
            raise KeyboardInterrupt
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]


def test_atomic_path_success(tmp_path):
    target = tmp_path / "file.bin"
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"data")
        assert not target.exists()  # not visible before the block ends
    assert target.read_bytes() == b"data"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_write_corrupted_failure_leaves_no_file(tmp_path):
    idx = make_index()
    idx.sample_id = idx.sample_id[:-1]  # columns of different lengths: the table cannot be built
    with pytest.raises((pa.ArrowInvalid, ValueError)):
        write_corrupted(tmp_path / "t.parquet", idx)
    assert list(tmp_path.iterdir()) == []
