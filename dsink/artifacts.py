"""Artifacts of the public contract: atomic writes, Parquet schemas, and readers that validate.

Every output is written to a temporary file beside its target and renamed into place, so a killed stage
never leaves a half-written file for DVC to cache. Readers check everything a downstream stage relies on
(columns, dtypes, ids, widths, finiteness) and raise :class:`~dsink.errors.DsinkError` with one line.
Parquet metadata is parsed as JSON with a size limit (artifacts may come from shared buckets).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dsink.errors import DsinkError

META_KEY = b"dsink"
MAX_META_BYTES = 1 << 20  # 1 MiB: plenty for class names and params, small enough to refuse junk


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600; give the artifact the permissions a plain open() would have
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json(path: str | Path, obj: Any) -> None:
    """Atomically write ``obj`` as pretty, key-sorted JSON (stable bytes for stable hashes)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _with_meta(schema: pa.Schema, meta: dict[str, Any]) -> pa.Schema:
    return schema.with_metadata({META_KEY: json.dumps(meta, sort_keys=True).encode()})


def with_meta(table: pa.Table, meta: dict[str, Any]) -> pa.Table:
    """``table`` with ``meta`` as its ``dsink`` schema metadata (key-sorted JSON: stable bytes)."""
    return table.replace_schema_metadata(_with_meta(table.schema, meta).metadata)


def write_parquet(path: str | Path, table: pa.Table) -> None:
    """Atomically write ``table`` with zstd compression and no volatile metadata (byte-stable)."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", use_dictionary=False, write_statistics=False)


def read_meta(schema: pa.Schema, where: str) -> dict[str, Any]:
    """The JSON under schema metadata key ``dsink`` (size-limited, must be an object)."""
    raw = (schema.metadata or {}).get(META_KEY)
    if raw is None:
        return {}
    if len(raw) > MAX_META_BYTES:
        raise DsinkError(
            f"{where}: 'dsink' metadata is {len(raw)} bytes; refusing more than {MAX_META_BYTES}"
        )
    try:
        meta = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DsinkError(f"{where}: 'dsink' metadata is not valid JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise DsinkError(f"{where}: 'dsink' metadata must be a JSON object")
    return meta


def _read_table(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    path = Path(path)
    if not path.is_file():
        raise DsinkError(f"{path}: file not found")
    try:
        return pq.read_table(path, columns=columns)
    except (pa.ArrowException, OSError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DsinkError(f"{path}: not a readable Parquet file ({msg})") from exc


def _require_columns(table: pa.Table, spec: dict[str, tuple[str, ...]], where: str) -> None:
    for name, kinds in spec.items():
        if name not in table.column_names:
            raise DsinkError(f"{where}: missing column {name!r} (have {table.column_names})")
        t = table.schema.field(name).type
        ok = (
            ("int" in kinds and pa.types.is_integer(t))
            or ("bool" in kinds and pa.types.is_boolean(t))
            or ("string" in kinds and (pa.types.is_string(t) or pa.types.is_large_string(t)))
        )
        if not ok:
            raise DsinkError(f"{where}: column {name!r} has type {t}; expected {' or '.join(kinds)}")


# ---------------------------------------------------------------- corrupted training index


@dataclass
class CorruptedIndex:
    """``data/corrupted/train.parquet`` in memory."""

    sample_id: np.ndarray  # int64, unique, sorted
    clean_label: np.ndarray
    noisy_label: np.ndarray
    is_noisy: np.ndarray
    meta: dict[str, Any]

    @property
    def num_classes(self) -> int:
        return int(self.meta["num_classes"])

    @property
    def dataset(self) -> str:
        return str(self.meta["dataset"])

    def noisy_prior(self) -> np.ndarray:
        """Class frequencies of the (noisy) training labels: the prior a model trained on them learns."""
        counts = np.bincount(self.noisy_label, minlength=self.num_classes).astype(np.float64)
        return counts / counts.sum()

    def clean_counts(self) -> np.ndarray:
        return np.bincount(self.clean_label, minlength=self.num_classes)


def write_corrupted(path: str | Path, idx: CorruptedIndex) -> None:
    table = pa.table(
        {
            "sample_id": pa.array(idx.sample_id, pa.int64()),
            "clean_label": pa.array(idx.clean_label, pa.int64()),
            "noisy_label": pa.array(idx.noisy_label, pa.int64()),
            "is_noisy": pa.array(idx.is_noisy, pa.bool_()),
        }
    )
    write_parquet(path, table.replace_schema_metadata(_with_meta(table.schema, idx.meta).metadata))


def read_corrupted(path: str | Path) -> CorruptedIndex:
    """Read and validate the corrupted index (columns, dtypes, unique ids, labels in range)."""
    where = str(path)
    table = _read_table(path)
    _require_columns(
        table,
        {"sample_id": ("int",), "clean_label": ("int",), "noisy_label": ("int",), "is_noisy": ("bool",)},
        where,
    )
    meta = read_meta(table.schema, where)
    for key in ("dataset", "num_classes"):
        if key not in meta:
            raise DsinkError(
                f"{where}: 'dsink' metadata lacks {key!r}; regenerate it with `dvc repro corrupt`"
            )
    C = meta["num_classes"]
    if not isinstance(C, int) or C < 2:
        raise DsinkError(f"{where}: metadata num_classes = {C!r}; expected an integer >= 2")
    names = ("sample_id", "clean_label", "noisy_label", "is_noisy")
    for name in names:
        nulls = table.column(name).null_count
        if nulls:  # to_numpy() would turn them into NaN -> INT64_MIN labels or False flags
            raise DsinkError(f"{where}: column {name!r} has {nulls} null values")
    cols = {n: table.column(n).to_numpy() for n in names}
    if table.num_rows == 0:
        raise DsinkError(f"{where}: has no rows")
    ids = cols["sample_id"].astype(np.int64)
    if np.unique(ids).size != ids.size:
        raise DsinkError(f"{where}: sample_id has duplicates")
    if ids.min() < 0:
        raise DsinkError(f"{where}: sample_id {int(ids.min())} is negative; expected indices >= 0")
    for name in ("clean_label", "noisy_label"):
        v = cols[name]
        if v.min() < 0 or v.max() >= C:
            raise DsinkError(f"{where}: {name} outside 0..{C - 1}")
    return CorruptedIndex(
        ids,
        cols["clean_label"].astype(np.int64),
        cols["noisy_label"].astype(np.int64),
        cols["is_noisy"].astype(bool),
        meta,
    )


# ---------------------------------------------------------------- validation split


@dataclass
class ValidationSplit:
    """``data/corrupted/val.parquet`` in memory: source training images held out with their clean labels."""

    sample_id: np.ndarray  # int64, unique, sorted; indices into the source training set
    label: np.ndarray  # int64 clean source labels
    meta: dict[str, Any]

    def __len__(self) -> int:
        return int(self.sample_id.size)


def write_validation(path: str | Path, val: ValidationSplit) -> None:
    """Atomically write the validation split (zero rows when there is none)."""
    table = pa.table(
        {
            "sample_id": pa.array(np.asarray(val.sample_id, dtype=np.int64), pa.int64()),
            "label": pa.array(np.asarray(val.label, dtype=np.int64), pa.int64()),
        }
    )
    write_parquet(path, table.replace_schema_metadata(_with_meta(table.schema, val.meta).metadata))


def read_validation(path: str | Path, index: CorruptedIndex | None = None) -> ValidationSplit:
    """Read and validate the validation split (columns, dtypes, no nulls, unique ids >= 0, labels in range).

    With ``index``: the dataset and class count must match the corrupted set's, and no id may also be a
    training id (a validation image the models trained on measures nothing).
    """
    where = str(path)
    table = _read_table(path)
    _require_columns(table, {"sample_id": ("int",), "label": ("int",)}, where)
    meta = read_meta(table.schema, where)
    for name in ("sample_id", "label"):
        nulls = table.column(name).null_count
        if nulls:
            raise DsinkError(f"{where}: column {name!r} has {nulls} null values")
    ids = table.column("sample_id").to_numpy().astype(np.int64)
    labels = table.column("label").to_numpy().astype(np.int64)
    if np.unique(ids).size != ids.size:
        raise DsinkError(f"{where}: sample_id has duplicates")
    if ids.size and ids.min() < 0:
        raise DsinkError(f"{where}: sample_id {int(ids.min())} is negative; expected indices >= 0")
    if index is not None:
        C = index.num_classes
        if "dataset" in meta and meta["dataset"] != index.dataset:
            raise DsinkError(
                f"{where}: made from dataset {meta['dataset']!r}; the corrupted set is {index.dataset!r}; "
                "rerun `dvc repro corrupt`"
            )
        if "num_classes" in meta and meta["num_classes"] != C:
            raise DsinkError(
                f"{where}: metadata num_classes = {meta['num_classes']}; the corrupted set has {C}"
            )
        if labels.size and (labels.min() < 0 or labels.max() >= C):
            raise DsinkError(f"{where}: label outside 0..{C - 1}")
        shared = np.intersect1d(ids, index.sample_id)
        if shared.size:
            raise DsinkError(
                f"{where}: sample_id {int(shared[0])} is also a training sample ({shared.size} shared); "
                "rerun `dvc repro corrupt`"
            )
    order = np.argsort(ids, kind="stable")
    return ValidationSplit(ids[order], labels[order], meta)


# ---------------------------------------------------------------- teacher logits

SPLITS = ("train", "test", "val")


def logits_table(
    split: np.ndarray | list[str], sample_id: np.ndarray, logits: np.ndarray, meta: dict[str, Any]
) -> pa.Table:
    """A contract-shaped logits table: ``split`` string, ``sample_id`` int64, ``logits`` float32 list."""
    logits = np.ascontiguousarray(logits, dtype=np.float32)
    n, C = logits.shape
    flat = pa.array(logits.reshape(-1), pa.float32())
    table = pa.table(
        {
            "split": pa.array(np.asarray(split, dtype=object), pa.string()),
            "sample_id": pa.array(np.asarray(sample_id, dtype=np.int64), pa.int64()),
            "logits": pa.FixedSizeListArray.from_arrays(flat, C),
        }
    )
    return table.replace_schema_metadata(_with_meta(table.schema, meta).metadata)


def write_logits(path: str | Path, table: pa.Table) -> None:
    write_parquet(path, table)


@dataclass
class TeacherLogits:
    """A validated teacher logits file, aligned to the corrupted index (train) and the test set."""

    train: np.ndarray  # float32 (n_train, C), row i is corrupted-index row i
    test: np.ndarray  # float32 (n_test, C), row j is test sample j
    meta: dict[str, Any]
    # float32 (n_val, C) in the order of the ``val_ids`` asked for; None when not asked or the file has none
    val: np.ndarray | None = None


def read_logits(
    path: str | Path,
    index: CorruptedIndex,
    num_test: int | None = None,
    role: str | None = None,
    val_ids: np.ndarray | None = None,
) -> TeacherLogits:
    """Read a teacher logits Parquet and check it against the corrupted set.

    Train rows must cover exactly the ids of the corrupted index (no missing, unknown or duplicate id),
    the width must equal ``num_classes``, and every value must be finite. Rows are returned in the order
    of the corrupted index and of the test set, whatever order the file has them in.

    ``val`` rows are optional (a file made elsewhere, or with no validation split, has none). With
    ``val_ids`` (the validation split's ids), a file that has val rows must cover exactly those ids and
    they are returned in that order as ``.val``; a file without val rows gives ``.val = None``. Without
    ``val_ids`` the val rows are checked (finite, no duplicate) but not returned.
    """
    where = str(path)
    table = _read_table(path)
    _require_columns(table, {"split": ("string",), "sample_id": ("int",)}, where)
    if "logits" not in table.column_names:
        raise DsinkError(f"{where}: missing column 'logits' (have {table.column_names})")
    meta = read_meta(table.schema, where)
    C = index.num_classes
    ltype = table.schema.field("logits").type
    if pa.types.is_fixed_size_list(ltype) or pa.types.is_list(ltype) or pa.types.is_large_list(ltype):
        if not pa.types.is_floating(ltype.value_type):
            raise DsinkError(f"{where}: column 'logits' holds {ltype.value_type}; expected float32 values")
    else:
        raise DsinkError(f"{where}: column 'logits' has type {ltype}; expected a fixed-size list of float32")
    if pa.types.is_fixed_size_list(ltype) and ltype.list_size != C:
        raise DsinkError(f"{where}: logits width is {ltype.list_size}; the corrupted set has {C} classes")
    if "num_classes" in meta and meta["num_classes"] != C:
        raise DsinkError(f"{where}: metadata num_classes = {meta['num_classes']}; the corrupted set has {C}")
    if "dataset" in meta and meta["dataset"] != index.dataset:
        raise DsinkError(
            f"{where}: teacher was made on dataset {meta['dataset']!r}; the corrupted set is "
            f"{index.dataset!r}"
        )
    if role is not None and "role" in meta and meta["role"] != role:
        raise DsinkError(f"{where}: metadata role = {meta['role']!r}; expected {role!r}")
    col = table.column("logits").combine_chunks()
    if col.null_count:
        raise DsinkError(f"{where}: column 'logits' has {col.null_count} null rows")
    values = col.flatten().to_numpy(zero_copy_only=False)
    if values.size != table.num_rows * C:
        raise DsinkError(f"{where}: logits rows are not all of width {C}")
    logits = values.astype(np.float32, copy=False).reshape(table.num_rows, C)
    bad = ~np.isfinite(logits)
    if bad.any():
        row = int(np.flatnonzero(bad.any(1))[0])
        raise DsinkError(f"{where}: {int(bad.sum())} non-finite logits (NaN/inf), first in row {row}")
    split = np.asarray(table.column("split").to_pylist(), dtype=object)
    unknown = set(np.unique(split).tolist()) - set(SPLITS)
    if unknown:
        raise DsinkError(
            f"{where}: unknown split values {sorted(unknown)}; expected 'train', 'test' or 'val'"
        )
    ids = table.column("sample_id").to_numpy().astype(np.int64)
    has_val = bool((split == "val").any())
    checks: list[tuple[str, np.ndarray | None]] = [("train", index.sample_id), ("test", None)]
    if has_val:
        checks.append(("val", None if val_ids is None else np.asarray(val_ids, dtype=np.int64)))
    out: dict[str, np.ndarray | None] = {"val": None}
    for name, expected in checks:
        sel = split == name
        sid = ids[sel]
        if np.unique(sid).size != sid.size:
            dup = int(sid[np.flatnonzero(np.diff(np.sort(sid)) == 0)[0]])
            raise DsinkError(f"{where}: duplicate {name} sample_id {dup}")
        if name == "val" and expected is None:
            continue  # nobody asked for them: checked for duplicates (and finiteness, above) only
        if expected is None:
            n = num_test if num_test is not None else sid.size
            expected = np.arange(n, dtype=np.int64)
        order = np.argsort(sid, kind="stable")
        sorted_ids = sid[order]
        exp_sorted = np.sort(expected)
        if sorted_ids.size != exp_sorted.size or not np.array_equal(sorted_ids, exp_sorted):
            missing = np.setdiff1d(exp_sorted, sorted_ids)
            extra = np.setdiff1d(sorted_ids, exp_sorted)
            detail = (
                f"missing id {int(missing[0])} ({missing.size} missing)"
                if missing.size
                else f"unknown id {int(extra[0])} ({extra.size} unknown)"
            )
            target = {"train": "corrupted set", "test": "test set", "val": "validation split"}[name]
            raise DsinkError(f"{where}: {name} rows do not match the {target}: {detail}")
        # rows of this split sorted by id, then placed in the order of ``expected``
        rows = np.flatnonzero(sel)[order]
        pos = np.searchsorted(sorted_ids, expected)
        out[name] = logits[rows[pos]]
    train, test = out["train"], out["test"]
    assert train is not None and test is not None
    return TeacherLogits(train, test, meta, out["val"])
