"""End to end: `dvc repro` in a temporary copy of the repo, on the tiny synthetic dataset.

Checks the contract's artifacts exist with the right shapes, that a params change reruns only the stages
downstream of it, and that a no-op repro runs nothing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DVC = str(Path(sys.executable).with_name("dvc"))
ALL_STAGES = {
    "corrupt",
    "train_teacher@imbalance",
    "train_teacher@noise",
    "dump_logits@imbalance",
    "dump_logits@noise",
    "distill",
    "evaluate",
}

pytestmark = pytest.mark.timeout(900)


def copy_repo(dest: Path) -> Path:
    """The working tree as git sees it (tracked + untracked, not ignored), as a fresh git + DVC repo."""
    files = (
        subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for rel in filter(None, files):
        src = ROOT / rel
        if not src.is_file() or rel.startswith(("tests/", "bench/")):
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel)
    for sub in (".dvc",):
        shutil.copytree(
            ROOT / sub, dest / sub, dirs_exist_ok=True, ignore=shutil.ignore_patterns("tmp", "cache")
        )
    return dest


def tiny_params(path: Path, epochs: int = 2) -> None:
    params = yaml.safe_load(path.read_text())
    params["data"].update(dataset="synthetic")
    params["data"]["imbalance"]["ratio"] = 5
    params["data"]["synthetic"].update(num_classes=4, image_size=8, train_per_class=60, test_per_class=15)
    for sec in (params["teachers"]["imbalance"], params["teachers"]["noise"], params["distill"]):
        sec.update(epochs=epochs, batch_size=32, track_every=1)
    params["evaluate"].update(many_threshold=40, few_threshold=20)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def env() -> dict[str, str]:
    return dict(
        os.environ,
        DSINK_PYTHON=sys.executable,
        TQDM_DISABLE="1",
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@t.invalid",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@t.invalid",
    )


def run(cmd: list[str], cwd: Path) -> str:
    res = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout}\n{res.stderr}"
    return res.stdout + res.stderr


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    dest = copy_repo(tmp_path_factory.mktemp("repo"))
    tiny_params(dest / "params.yaml")
    (dest / "data" / "raw").mkdir(parents=True, exist_ok=True)
    run(["git", "init", "-q"], dest)
    run(["git", "add", "-A"], dest)
    run(["git", "commit", "-qm", "init"], dest)
    return dest


def test_repro_corrupt_then_everything(repo: Path):
    out = run([DVC, "repro", "corrupt"], repo)
    assert ran_stages(out) == {"corrupt"}
    table = pq.read_table(repo / "data/corrupted/train.parquet")
    assert table.column_names == ["sample_id", "clean_label", "noisy_label", "is_noisy"]
    out = run([DVC, "repro"], repo)
    assert ran_stages(out) == ALL_STAGES - {"corrupt"}
    metrics = json.loads((repo / "metrics/evaluate.json").read_text())
    for name in ("dsink", "imbalance_teacher", "noise_teacher"):
        for key in ("top1", "many", "medium", "few"):
            assert metrics[name][key] is None or 0.0 <= metrics[name][key] <= 1.0
    assert 0.0 <= metrics["dsink"]["corrected"] <= 1.0
    logits = pq.read_table(repo / "data/logits/noise.parquet")
    assert logits.schema.field("logits").type.list_size == 4
    for png in ("per_class", "confusion", "curves", "corrected"):
        assert (repo / "plots" / f"{png}.png").stat().st_size > 1000
    # nothing changed: nothing runs
    assert ran_stages(run([DVC, "repro"], repo)) == set()
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "baseline"], repo)


def test_params_change_reruns_only_downstream(repo: Path):
    if not (repo / "dvc.lock").exists():
        pytest.skip("needs the pipeline from the previous test")
    out = run([DVC, "exp", "run", "-S", "teachers.noise.epochs=1"], repo)
    assert ran_stages(out) == {"train_teacher@noise", "dump_logits@noise", "distill", "evaluate"}
    out = run([DVC, "exp", "run", "-S", "evaluate.few_threshold=10"], repo)
    assert ran_stages(out) == {"evaluate"}
    out = run([DVC, "exp", "run", "-S", "data.noise.rate=0.2", "corrupt"], repo)
    assert ran_stages(out) == {"corrupt"}
