"""End to end: new pixels in an ImageFolder dataset make every stage that reads them stale.

`dvc repro` in a temporary copy of the repo on a tiny image_folder dataset (3 classes of 8x8 greyscale
PNGs, one epoch everywhere, a validation split of 2 images per class), then one training image is
rewritten with other pixels under the same name and class: the labels do not change, so before the
stages declared `${data.root}` only `corrupt` noticed and every teacher, dump, baseline, student and
evaluation stayed cached on the old image.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import ALL_STAGES, DVC, copy_repo, ran_stages, run, tiny_params

pytestmark = pytest.mark.timeout(900)

CLASSES = ("ants", "bees", "wasps")


def write_image(path: Path, seed: int, level: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = np.clip(level + rng.normal(0, 30, size=(8, 8)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode="L").save(path)


def make_image_folder(root: Path) -> None:
    for c, name in enumerate(CLASSES):
        for i in range(16):
            write_image(root / "train" / name / f"{i:02d}.png", seed=100 * c + i, level=50 + 70 * c)
        for i in range(4):
            write_image(root / "test" / name / f"{i:02d}.png", seed=10_000 + 100 * c + i, level=50 + 70 * c)


def test_new_pixels_rerun_every_stage_that_reads_them(tmp_path: Path):
    repo = copy_repo(tmp_path / "repo")
    tiny_params(repo / "params.yaml", epochs=1)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"].update(dataset="image_folder", root="data/raw", image_size=8)
    params["data"]["imbalance"]["ratio"] = 2
    params["data"]["validation"]["per_class"] = 2
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    make_image_folder(repo / "data" / "raw")
    run(["git", "init", "-q", "-b", "main"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "init"], repo)

    out = run([DVC, "repro"], repo)
    assert ran_stages(out) == ALL_STAGES
    # the validation split went through every model: val rows in each logits file, val metrics for each
    val = pq.read_table(repo / "data/corrupted/val.parquet")
    assert val.num_rows == 2 * len(CLASSES)
    for f in ("data/logits/noise.parquet", "data/student/logits.parquet", "data/baselines/ce/logits.parquet"):
        splits = pq.read_table(repo / f, columns=["split"]).column("split").to_pylist()
        assert splits.count("val") == val.num_rows, f
    metrics = json.loads((repo / "metrics/evaluate.json").read_text())
    for name in ("dsink", "imbalance_teacher", "noise_teacher", "teacher_average", "ce", "la_small_loss"):
        assert 0.0 <= metrics[name]["val"]["top1"] <= 1.0, name
    assert json.loads(run([DVC, "status", "--json"], repo)) == {}

    # same file name, same class, other pixels
    write_image(repo / "data/raw/train/bees/03.png", seed=999, level=200)
    status = json.loads(run([DVC, "status", "--json"], repo))
    assert set(status) == ALL_STAGES
    for stage, changes in status.items():
        changed = {
            k: v
            for entry in changes
            if isinstance(entry, dict)
            for k, v in entry.get("changed deps", {}).items()
        }
        assert changed.get("data/raw") == "modified", (stage, changes)
