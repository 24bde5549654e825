"""Feed corrected labels back into the pipeline: a label file for ``data.noise.type: file``.

    .venv/bin/python -m dsink.relabel [--issues data/label_issues.csv]
                                      [--out data/noisy_labels/relabelled.npy]

Starts from the labels the pipeline trained on (the corrupted set's given labels for the kept samples,
the source labels elsewhere) and applies every row of the issues CSV: sample ``sample_id`` gets
``suggested_label``. Review the CSV first (delete the rows you disagree with, edit ``suggested_label``
where you know better); the file written holds one label per index of the source training set, which is
what ``data.noise.type: file`` reads. Then set in params.yaml::

    data:
      noise: {type: file, file: data/noisy_labels/relabelled.npy}

and ``dvc repro``: every model retrains on the corrected labels.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

from dsink import stage
from dsink.artifacts import atomic_path, read_corrupted
from dsink.errors import DsinkError


def relabelled(
    source_labels: np.ndarray,
    sample_id: np.ndarray,
    given: np.ndarray,
    edits: dict[int, int],
    num_classes: int,
) -> np.ndarray:
    """Source labels, the given labels on the kept ids, then ``edits`` (sample id -> new label)."""
    out = np.asarray(source_labels, dtype=np.int64).copy()
    out[sample_id] = given
    for sid, label in edits.items():
        if not 0 <= sid < out.size:
            raise DsinkError(f"sample_id {sid} is outside the source training set (0..{out.size - 1})")
        if not 0 <= label < num_classes:
            raise DsinkError(f"sample_id {sid}: suggested_label {label} outside 0..{num_classes - 1}")
        out[sid] = label
    return out


def read_edits(path: str | Path) -> dict[int, int]:
    """``sample_id -> suggested_label`` from an issues CSV (as written by the label_issues stage)."""
    path = Path(path)
    if not path.is_file():
        raise DsinkError(f"{path}: file not found; run `dvc repro label_issues` first")
    edits: dict[int, int] = {}
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        missing = {"sample_id", "suggested_label"} - set(reader.fieldnames or [])
        if missing:
            raise DsinkError(f"{path}: missing column(s) {sorted(missing)}")
        for line, row in enumerate(reader, start=2):
            try:
                edits[int(row["sample_id"])] = int(row["suggested_label"])
            except ValueError as exc:
                raise DsinkError(
                    f"{path}, line {line}: sample_id and suggested_label must be integers"
                ) from exc
    return edits


def main(args: argparse.Namespace) -> None:
    from dsink.data.sources import load_source
    from dsink.params import load_params

    params = load_params(args.params)
    index = read_corrupted(args.corrupted)
    labels = load_source(params.data).train.labels
    known = set(index.sample_id.tolist())
    edits = read_edits(args.issues)
    unknown = sorted(set(edits) - known)
    if unknown:
        raise DsinkError(f"{args.issues}: sample_id {unknown[0]} is not in {args.corrupted}")
    out = relabelled(labels, index.sample_id, index.noisy_label, edits, index.num_classes)
    changed = int((out[index.sample_id] != index.noisy_label).sum())
    with atomic_path(args.out) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, out)
    print(f"relabel: {changed} of {index.sample_id.size} training labels changed -> {args.out}")


def cli(argv: list[str] | None = None) -> None:
    p = stage.parser(__doc__)
    p.add_argument("--corrupted", default="data/corrupted/train.parquet", help="corrupted index")
    p.add_argument("--issues", default="data/label_issues.csv", help="issues CSV (rows to apply)")
    p.add_argument("--out", default="data/noisy_labels/relabelled.npy", help="label file to write")
    stage.run(main, p, argv)


if __name__ == "__main__":
    cli()
