"""A stage killed with SIGKILL part-way resumes from its checkpoint and ends byte-identical to a clean run.

Also: SIGTERM stops a stage with a message and no output; a params change does not resume a stale run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(600)


def setup_dir(d: Path, epochs: int = 6) -> Path:
    d.mkdir(parents=True)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(dataset="synthetic", root=str(d / "raw"))
    params["data"]["imbalance"]["ratio"] = 4
    params["data"]["synthetic"].update(num_classes=3, image_size=8, train_per_class=300, test_per_class=10)
    params["teachers"]["noise"].update(epochs=epochs, batch_size=16, track_every=0)
    (d / "params.yaml").write_text(yaml.safe_dump(params))
    env = dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, str(ROOT / "stages/corrupt.py")], cwd=d, env=env, check=True)
    return d


def train_cmd() -> list[str]:
    return [sys.executable, str(ROOT / "stages/train_teacher.py"), "--role", "noise"]


def env() -> dict[str, str]:
    return dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS="1")


def checkpoint_epoch(d: Path) -> int:
    ckpts = list((d / ".dsink" / "checkpoints").rglob("last.pt"))
    if not ckpts:
        return -1
    try:
        return int(torch.load(ckpts[0], weights_only=True)["epoch"])
    except Exception:  # being replaced right now
        return -1


def kill_after_epoch(d: Path, epoch: int, sig: int) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(
        train_cmd(), cwd=d, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 240
    while checkpoint_epoch(d) < epoch and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_sigkill_then_rerun_equals_uninterrupted(tmp_path):
    ref = setup_dir(tmp_path / "ref")
    subprocess.run(train_cmd(), cwd=ref, env=env(), check=True, capture_output=True)
    reference = (ref / "data/teachers/noise/model.pt").read_bytes()

    d = setup_dir(tmp_path / "killed")
    for kill_at in (1, 3):  # killed twice, at different points
        res = kill_after_epoch(d, kill_at, signal.SIGKILL)
        assert res.returncode == -signal.SIGKILL
        assert not (d / "data/teachers/noise/model.pt").exists()
    res = subprocess.run(train_cmd(), cwd=d, env=env(), check=True, capture_output=True, text=True)
    assert "resuming after epoch" in res.stdout
    assert (d / "data/teachers/noise/model.pt").read_bytes() == reference
    assert not list((d / ".dsink" / "checkpoints").rglob("last.pt")), "a finished run leaves no checkpoint"
    # the logits dumped from the two runs, in two processes, are byte-identical too
    dump = [sys.executable, str(ROOT / "stages/dump_logits.py"), "--role", "noise"]
    for where in (ref, d):
        subprocess.run(dump, cwd=where, env=env(), check=True, capture_output=True)
    logits = (ref / "data/logits/noise.parquet").read_bytes()
    assert logits == (d / "data/logits/noise.parquet").read_bytes()


def test_sigterm_stops_cleanly_and_params_change_starts_fresh(tmp_path):
    d = setup_dir(tmp_path / "term")
    res = kill_after_epoch(d, 0, signal.SIGTERM)
    assert res.returncode == 128 + signal.SIGTERM
    assert "stopped by SIGTERM" in res.stderr and "Traceback" not in res.stderr
    assert not (d / "data/teachers/noise/model.pt").exists()
    params = yaml.safe_load((d / "params.yaml").read_text())
    params["teachers"]["noise"]["lr"] = 0.01  # a different run: must not resume the stale checkpoint
    (d / "params.yaml").write_text(yaml.safe_dump(params))
    res = subprocess.run(train_cmd(), cwd=d, env=env(), check=True, capture_output=True, text=True)
    assert "resuming" not in res.stdout


def test_distill_sigkill_then_rerun_equals_uninterrupted(tmp_path):
    """`distill` checkpoints like the teachers: killed mid-cycle, it resumes to the same student.

    Dataset scope with ``resolve_every: 3`` (solves before epochs 0 and 3): killed after epoch 0 or 1,
    the resumed run must use the checkpointed solve (the student's weights at epoch 0 and its class
    scaling), not re-solve from the resumed model.
    """
    import json

    import numpy as np

    from dsink.artifacts import logits_table, read_corrupted, write_logits

    def prepare(d: Path) -> Path:
        setup_dir(d)
        params = yaml.safe_load((d / "params.yaml").read_text())
        params["distill"].update(epochs=5, batch_size=16, track_every=0, scope="dataset", resolve_every=3)
        (d / "params.yaml").write_text(yaml.safe_dump(params))
        idx = read_corrupted(d / "data/corrupted/train.parquet")
        n_te = 30
        for k, role in enumerate(("imbalance", "noise")):
            z = np.random.default_rng(k).normal(size=(idx.sample_id.size + n_te, 3)).astype(np.float32)
            z[: idx.sample_id.size] += 3 * np.eye(3, dtype=np.float32)[idx.clean_label]
            split = np.array(["train"] * idx.sample_id.size + ["test"] * n_te, dtype=object)
            ids = np.concatenate([idx.sample_id, np.arange(n_te)])
            write_logits(d / f"data/logits/{role}.parquet", logits_table(split, ids, z, {"role": role}))
        return d

    cmd = [sys.executable, str(ROOT / "stages/distill.py")]
    ref = prepare(tmp_path / "ref")
    subprocess.run(cmd, cwd=ref, env=env(), check=True, capture_output=True)
    d = prepare(tmp_path / "killed")
    proc = subprocess.Popen(cmd, cwd=d, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while checkpoint_epoch(d) < 0 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "distill finished before it could be killed"
    proc.kill()
    proc.communicate(timeout=60)
    killed_after = checkpoint_epoch(d)
    assert killed_after in (0, 1), f"killed after epoch index {killed_after}: not mid-cycle"
    assert not (d / "data/student/model.pt").exists()
    res = subprocess.run(cmd, cwd=d, env=env(), check=True, capture_output=True, text=True)
    assert f"resuming after epoch {killed_after + 1}" in res.stdout
    for name in ("model.pt", "logits.parquet"):
        assert (d / "data/student" / name).read_bytes() == (ref / "data/student" / name).read_bytes(), name
    # the solver curves too: one solve before epoch 0 and one before epoch 3, none at the resume
    live = [json.loads((where / "dvclive/student/metrics.json").read_text()) for where in (ref, d)]
    assert live[0] == live[1]
    tsv = (d / "dvclive/student/plots/metrics/sinkhorn_resolved.tsv").read_text().split()
    assert [float(v) for v in tsv[3::2]] == [1.0, 0.0, 0.0, 1.0, 0.0], tsv


@pytest.mark.parametrize("delay", [0.5, 2.0, 3.5])
def test_dump_logits_killed_at_any_point_leaves_nothing_partial(tmp_path, delay):
    """SIGKILL at several moments: the output is either absent or complete, never partial; rerun completes."""
    from dsink.checkpoints import save_state_dict
    from dsink.models import build_model

    d = setup_dir(tmp_path / "d")
    params = yaml.safe_load((d / "params.yaml").read_text())
    params["teachers"]["noise"].update(folds=1, model="small_cnn")  # the hand-made file: one small_cnn
    (d / "params.yaml").write_text(yaml.safe_dump(params))
    torch.manual_seed(0)
    save_state_dict(build_model("small_cnn", 3, 1), d / "data/teachers/noise/model.pt")
    cmd = [sys.executable, str(ROOT / "stages/dump_logits.py"), "--role", "noise"]
    subprocess.run(cmd, cwd=d, env=env(), check=True, capture_output=True)
    out = d / "data/logits/noise.parquet"
    reference = out.read_bytes()
    out.unlink()
    proc = subprocess.Popen(cmd, cwd=d, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(delay)
    proc.kill()
    proc.communicate(timeout=60)
    assert not out.exists() or out.read_bytes() == reference
    subprocess.run(cmd, cwd=d, env=env(), check=True, capture_output=True)
    assert out.read_bytes() == reference
