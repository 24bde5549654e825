"""Shared helpers for the end-to-end tests: a temporary copy of the repo on the tiny synthetic dataset, and
`dvc` / `git` runners whose stage commands find this venv (`DSINK_PYTHON`)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

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
    "train_baseline@ce",
    "train_baseline@la_small_loss",
    "distill",
    "evaluate",
    "label_issues",
}
TEACHER_STAGES = {
    "train_teacher@imbalance",
    "train_teacher@noise",
    "dump_logits@imbalance",
    "dump_logits@noise",
}


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
    params["data"]["validation"]["per_class"] = 5
    params["train"].update(epochs=epochs, batch_size=32, track_every=1)  # every model's
    # estimate the noise rate after one epoch, so the noise teacher's selection acts within the 2 epochs
    # (with the default 2 warm-up epochs it would train exactly like the plain-CE baseline, bit for bit)
    params["teachers"]["noise"]["estimate_epochs"] = 1
    # ... and forget the whole estimated share at once: ramped, per-class selection (which rounds each
    # class's kept count up) would keep every sample of a 32-sample batch in epoch 2
    params["teachers"]["noise"]["ramp_epochs"] = 1
    params["baselines"]["la_small_loss"]["estimate_epochs"] = 1  # the same for the one-model baseline
    params["evaluate"].update(many_threshold=40, few_threshold=20)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def env(**extra: str) -> dict[str, str]:
    venv_bin = str(Path(sys.executable).parent)  # DVC's queue workers start `dvc` from PATH
    return dict(
        os.environ,
        PATH=venv_bin + os.pathsep + os.environ.get("PATH", ""),
        DSINK_PYTHON=sys.executable,
        TQDM_DISABLE="1",
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@t.invalid",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@t.invalid",
        **extra,
    )


def run(cmd: list[str], cwd: Path, env_: dict[str, str] | None = None, timeout: float | None = None) -> str:
    res = subprocess.run(cmd, cwd=cwd, env=env_ or env(), capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout}\n{res.stderr}"
    return res.stdout + res.stderr


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def init_repo(dest: Path, epochs: int = 2) -> Path:
    """`copy_repo` + `tiny_params`, committed as the first commit of a new git repo."""
    copy_repo(dest)
    tiny_params(dest / "params.yaml", epochs=epochs)
    (dest / "data" / "raw").mkdir(parents=True, exist_ok=True)
    run(["git", "init", "-q", "-b", "main"], dest)
    run(["git", "add", "-A"], dest)
    run(["git", "commit", "-qm", "init"], dest)
    return dest


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return init_repo(tmp_path_factory.mktemp("repo"))
