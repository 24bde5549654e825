"""Teacher logits Parquet: exact round trip, byte-stable writes, and every malformed file rejected."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dsink.artifacts import CorruptedIndex, logits_table, read_logits, write_logits
from dsink.errors import DsinkError

C, N_TEST = 4, 6
IDS = np.array([3, 7, 8, 12, 20], dtype=np.int64)


def index() -> CorruptedIndex:
    lab = np.array([0, 1, 2, 3, 0])
    return CorruptedIndex(IDS, lab, lab, np.zeros(5, bool), {"dataset": "synthetic", "num_classes": C})


def logits(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    g = np.random.default_rng(seed)
    return g.normal(size=(5, C)).astype(np.float32), g.normal(size=(N_TEST, C)).astype(np.float32)


def write(path, train, test, ids=IDS, test_ids=None, meta=None, split=None):
    test_ids = np.arange(N_TEST) if test_ids is None else test_ids
    split = split if split is not None else ["train"] * len(ids) + ["test"] * len(test_ids)
    meta = (
        meta
        if meta is not None
        else {"role": "noise", "method": "gce", "dataset": "synthetic", "num_classes": C}
    )
    table = logits_table(
        np.array(split, dtype=object), np.concatenate([ids, test_ids]), np.concatenate([train, test]), meta
    )
    write_logits(path, table)


def test_round_trip_is_exact_and_reordered_rows_are_aligned(tmp_path):
    tr, te = logits()
    perm = np.array([4, 2, 0, 1, 3])
    write(tmp_path / "a.parquet", tr[perm], te, ids=IDS[perm])
    out = read_logits(tmp_path / "a.parquet", index(), N_TEST, role="noise")
    assert np.array_equal(out.train, tr) and np.array_equal(out.test, te)
    assert out.train.dtype == np.float32
    schema = pq.read_schema(tmp_path / "a.parquet")
    assert pa.types.is_fixed_size_list(schema.field("logits").type)
    assert schema.field("logits").type.value_type == pa.float32()
    assert json.loads(schema.metadata[b"dsink"])["num_classes"] == C
    assert pq.ParquetFile(tmp_path / "a.parquet").metadata.row_group(0).column(0).compression == "ZSTD"


def test_writes_are_byte_identical(tmp_path):
    tr, te = logits()
    write(tmp_path / "a.parquet", tr, te)
    write(tmp_path / "b.parquet", tr, te)
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()


def bad_cases():
    tr, te = logits()
    nan = tr.copy()
    nan[2, 1] = np.nan
    inf = te.copy()
    inf[0, 0] = np.inf
    return {
        "missing id": (dict(train=tr[:4], test=te, ids=IDS[:4]), "missing id 20"),
        "unknown id": (dict(train=tr, test=te, ids=np.array([3, 7, 8, 12, 99])), "missing id 20"),
        "duplicate id": (
            dict(train=tr, test=te, ids=np.array([3, 7, 8, 8, 20])),
            "duplicate train sample_id 8",
        ),
        "nan": (dict(train=nan, test=te), "non-finite"),
        "inf": (dict(train=tr, test=inf), "non-finite"),
        "wrong width": (
            dict(train=np.zeros((5, C + 1), np.float32), test=np.zeros((N_TEST, C + 1), np.float32)),
            "width is 5",
        ),
        "test ids": (dict(train=tr, test=te, test_ids=np.arange(1, N_TEST + 1)), "test rows"),
        "bad split": (dict(train=tr, test=te, split=["train"] * 5 + ["dev"] * N_TEST), "unknown split"),
        "other dataset": (dict(train=tr, test=te, meta={"dataset": "cifar10", "num_classes": C}), "cifar10"),
        "other classes": (
            dict(train=tr, test=te, meta={"dataset": "synthetic", "num_classes": 7}),
            "num_classes",
        ),
    }


@pytest.mark.parametrize("case", sorted(bad_cases()))
def test_malformed_logits_are_rejected_with_one_line(tmp_path, case):
    kwargs, match = bad_cases()[case]
    write(tmp_path / "bad.parquet", **kwargs)
    with pytest.raises(DsinkError, match=match) as err:
        read_logits(tmp_path / "bad.parquet", index(), N_TEST)
    assert "\n" not in str(err.value) and "bad.parquet" in str(err.value)


def test_wrong_role_missing_column_and_garbage(tmp_path):
    tr, te = logits()
    write(tmp_path / "a.parquet", tr, te)
    with pytest.raises(DsinkError, match="role"):
        read_logits(tmp_path / "a.parquet", index(), N_TEST, role="imbalance")
    pq.write_table(pa.table({"split": ["train"], "sample_id": [3]}), tmp_path / "nolog.parquet")
    with pytest.raises(DsinkError, match="missing column 'logits'"):
        read_logits(tmp_path / "nolog.parquet", index(), N_TEST)
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DsinkError, match="not a readable Parquet"):
        read_logits(tmp_path / "junk.parquet", index(), N_TEST)
    data = (tmp_path / "a.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(DsinkError, match="not a readable Parquet"):
        read_logits(tmp_path / "cut.parquet", index(), N_TEST)
    with pytest.raises(DsinkError, match="not found"):
        read_logits(tmp_path / "nope.parquet", index(), N_TEST)


def test_oversized_metadata_is_refused(tmp_path):
    tr, te = logits()
    write(tmp_path / "big.parquet", tr, te, meta={"dataset": "synthetic", "pad": "x" * (2 << 20)})
    with pytest.raises(DsinkError, match="refusing"):
        read_logits(tmp_path / "big.parquet", index(), N_TEST)
