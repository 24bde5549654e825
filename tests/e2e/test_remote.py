"""End to end: sharing teacher logits through a DVC remote (README, "Sharing teacher logits through remote
storage").

User A runs the pipeline on the tiny synthetic dataset, commits, and pushes the DVC cache (and the run
cache) to a remote: a local directory, or S3 served by moto on loopback (credentials from environment
variables only). User B clones A's git repo, pulls only the corrupted set and the two teachers' logits,
and reproduces: neither teacher is retrained or re-dumped, no teacher checkpoint is downloaded, and B's
student (`model.pt`, logits) and metrics are byte-identical to A's (both run on this machine). An
experiment travels with `dvc exp push` / `dvc exp pull`. A wrong endpoint or missing credentials fail
fast with DVC's error, and the secret key is never printed or saved.
"""

from __future__ import annotations

import json
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import DVC, TEACHER_STAGES, env, init_repo, ran_stages, run

pytestmark = pytest.mark.timeout(600)

BUCKET = "dsink-remote"
# Random per session, so finding it anywhere it should not be is never a coincidence.
ACCESS_KEY = "AKIA" + secrets.token_hex(8).upper()
SECRET_KEY = "dsink-secret-" + secrets.token_hex(16)
# What user B pulls (README): the corrupted set and the two teachers' logits, not their checkpoints.
SHARED = ("data/corrupted/train.parquet", "data/logits/imbalance.parquet", "data/logits/noise.parquet")
# What a change of `distill` params reruns: the student and everything downstream of it.
STUDENT_STAGES = {"distill", "evaluate", "label_issues"}


@pytest.fixture(scope="module")
def aws_home(tmp_path_factory) -> Path:
    """Empty AWS config and credentials files, standing in for the host's ~/.aws."""
    home = tmp_path_factory.mktemp("aws")
    (home / "config").write_text("")
    (home / "credentials").write_text("")
    return home


def aws_env(aws_home: Path, credentials: bool) -> dict[str, str]:
    """`env()` without any AWS setting of the host (profiles, config files, instance metadata), plus the
    test credentials when asked: the only way DVC may learn them."""
    base = {k: v for k, v in env().items() if not k.startswith("AWS_")}
    base.update(
        AWS_DEFAULT_REGION="us-east-1",
        AWS_CONFIG_FILE=str(aws_home / "config"),
        AWS_SHARED_CREDENTIALS_FILE=str(aws_home / "credentials"),
        AWS_EC2_METADATA_DISABLED="true",
    )
    if credentials:
        base.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY)
    return base


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """A real S3-speaking server (moto) on a free loopback port, with an empty bucket."""
    boto3 = pytest.importorskip("boto3")
    server_mod = pytest.importorskip("moto.server")
    pytest.importorskip("dvc_s3")
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
    ).create_bucket(Bucket=BUCKET)
    yield endpoint
    server.stop()


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """User A's repo after `dvc repro`, with dvc.lock and the cache: false outputs committed."""
    repo = init_repo(tmp_path_factory.mktemp("built"))
    out = run([DVC, "repro"], repo)
    assert TEACHER_STAGES <= ran_stages(out)
    run(["git", "add", "-A"], repo)
    run(["git", "add", "dvclive"], repo)  # the curves are cache: false stage outputs, kept in git
    run(["git", "commit", "-qm", "pipeline results"], repo)
    return repo


def clone_workspace(src: Path, dest: Path) -> Path:
    """A copy of A's whole checkout (git history, DVC cache, outputs), so each test starts from it."""
    shutil.copytree(src, dest, symlinks=True)
    shutil.rmtree(dest / ".dvc" / "tmp", ignore_errors=True)
    return dest


def add_remote(repo: Path, kind: str, url: str, endpoint: str | None) -> None:
    run([DVC, "remote", "add", "-d", "storage", url], repo)
    if kind == "s3":
        run([DVC, "remote", "modify", "storage", "endpointurl", endpoint], repo)


def lock_md5(repo: Path, stage: str, path: str) -> str:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return next(o["md5"] for o in lock["stages"][stage]["outs"] if o["path"] == path)


def in_cache(repo: Path, md5: str) -> bool:
    return (repo / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]).exists()


def find_experiment(show: list, name: str) -> dict:
    for baseline in show:
        for exp in baseline.get("experiments") or []:
            for rev in exp["revs"]:
                if rev["name"] == name:
                    return rev["data"]
    raise AssertionError(f"experiment {name!r} not in `dvc exp show --json`: {json.dumps(show)[:2000]}")


def numbers(tree):
    """The numeric leaves of a metrics tree (what `dvc exp show` keeps of a metrics file)."""
    if isinstance(tree, dict):
        kept = {k: numbers(v) for k, v in tree.items()}
        return {k: v for k, v in kept.items() if v is not None and v != {}}
    return tree if isinstance(tree, (int, float)) and not isinstance(tree, bool) else None


def assert_no_secret(outputs: list[str], *repos: Path) -> None:
    for text in outputs:
        assert SECRET_KEY not in text
    for repo in repos:
        for name in ("config", "config.local"):
            cfg = repo / ".dvc" / name
            if cfg.exists():
                assert SECRET_KEY not in cfg.read_text()
                assert ACCESS_KEY not in cfg.read_text()


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_share_teacher_logits(kind: str, built: Path, aws_home: Path, tmp_path: Path, request):
    if kind == "s3":
        endpoint = request.getfixturevalue("s3_endpoint")
        url = f"s3://{BUCKET}/shared"
        env_ = aws_env(aws_home, credentials=True)
    else:
        endpoint = None
        url = str(tmp_path / "dvc-remote")
        env_ = aws_env(aws_home, credentials=False)
    outputs: list[str] = []

    def sh(cmd: list[str], cwd: Path) -> str:
        out = run(cmd, cwd, env_)
        outputs.append(out)
        return out

    # --- user A: remote config in git, data and run cache in the remote, git history in `origin` ---
    a = clone_workspace(built, tmp_path / "a")
    add_remote(a, kind, url, endpoint)
    sh(["git", "add", ".dvc/config"], a)
    sh(["git", "commit", "-qm", "DVC remote"], a)
    sh([DVC, "push"], a)
    sh([DVC, "push", "--run-cache"], a)
    origin = tmp_path / "origin.git"
    sh(["git", "init", "-q", "--bare", "-b", "main", str(origin)], tmp_path)
    sh(["git", "remote", "add", "origin", str(origin)], a)
    sh(["git", "push", "-q", "origin", "main"], a)

    # --- user B: clone, pull the logits (not the checkpoints), reproduce ---
    b = tmp_path / "b"
    sh(["git", "clone", "-q", str(origin), str(b)], tmp_path)
    sh([DVC, "pull", "corrupt", "dump_logits", "train_baseline"], b)  # logits + the comparisons
    for path in SHARED:
        assert (b / path).read_bytes() == (a / path).read_bytes(), path
    teacher_md5 = {
        role: lock_md5(a, f"train_teacher@{role}", f"data/teachers/{role}/model.pt")
        for role in ("imbalance", "noise")
    }

    def assert_no_checkpoints() -> None:
        for role, md5 in teacher_md5.items():
            assert not (b / f"data/teachers/{role}/model.pt").exists()
            assert not in_cache(b, md5), f"the {role} teacher's checkpoint was downloaded"

    assert_no_checkpoints()
    # DVC sees the teachers as stale (checkpoints missing): a plain `dvc repro` would retrain them ...
    stale = set(json.loads(sh([DVC, "status", "--json"], b)))
    assert {"train_teacher@imbalance", "train_teacher@noise"} <= stale
    # ... `--allow-missing` skips every stage whose only change is missing data: here, all of them.
    assert ran_stages(sh([DVC, "repro", "--allow-missing"], b)) == set()
    # Rebuilding the student from the shared logits gives A's student and metrics exactly: A and B run on
    # the same machine here, where CPU training is bit-reproducible, and `save_state_dict` writes through a
    # file handle, so the zip records do not carry the (temporary) file name. (On another CPU model B's
    # retrained student would match A's only approximately: README, "Reliability".)
    assert ran_stages(sh([DVC, "repro", "-f", "-s", "distill", "evaluate"], b)) == {"distill", "evaluate"}
    assert_no_checkpoints()
    for path in ("metrics/evaluate.json", "data/student/logits.parquet", "data/student/model.pt"):
        assert (b / path).read_bytes() == (a / path).read_bytes(), path
    assert lock_md5(b, "distill", "data/student/model.pt") == lock_md5(a, "distill", "data/student/model.pt")

    # --- an experiment of A, shared through the git remote and the DVC remote ---
    out = sh([DVC, "exp", "run", "-n", "alpha05", "-S", "distill.alpha=0.5"], a)
    assert ran_stages(out) == STUDENT_STAGES
    metrics_a = (a / "metrics/evaluate.json").read_bytes()
    sh([DVC, "exp", "push", "origin", "alpha05"], a)
    sh([DVC, "exp", "pull", "--no-cache", "origin", "alpha05"], b)
    exp = find_experiment(json.loads(sh([DVC, "exp", "show", "--json"], b)), "alpha05")
    assert exp["params"]["params.yaml"]["data"]["distill"]["alpha"] == 0.5
    assert numbers(exp["metrics"]["metrics/evaluate.json"]["data"]) == numbers(json.loads(metrics_a))
    if kind == "local":  # touches no remote, so once is enough
        # B reruns it from the shared logits: only the student and the evaluation run, with A's results.
        out = sh([DVC, "exp", "run", "--allow-missing", "-S", "distill.alpha=0.5"], b)
        assert ran_stages(out) == STUDENT_STAGES
        assert (b / "metrics/evaluate.json").read_bytes() == metrics_a
        assert_no_checkpoints()

    assert_no_secret(outputs, a, b)
    if kind == "s3":
        import boto3

        s3 = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
        )
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="shared/")["Contents"]]
        assert any("/files/md5/" in k for k in keys) and any("/runs/" in k for k in keys)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def push_fails_fast(repo: Path, env_: dict[str, str]) -> str:
    start = time.monotonic()
    res = subprocess.run(
        [DVC, "push"], cwd=repo, env=env_, capture_output=True, text=True, timeout=60
    )  # a hang would raise TimeoutExpired
    assert res.returncode != 0
    assert time.monotonic() - start < 60
    out = res.stdout + res.stderr
    assert_no_secret([out], repo)
    return out


def test_s3_wrong_endpoint_fails_fast(built: Path, aws_home: Path, tmp_path: Path):
    pytest.importorskip("dvc_s3")
    repo = clone_workspace(built, tmp_path / "a")
    add_remote(repo, "s3", f"s3://{BUCKET}/wrong-endpoint", f"http://127.0.0.1:{closed_port()}")
    out = push_fails_fast(repo, aws_env(aws_home, credentials=True))
    assert "Could not connect to the endpoint URL" in out


def test_s3_missing_credentials_fails_fast(built: Path, aws_home: Path, tmp_path: Path, s3_endpoint: str):
    repo = clone_workspace(built, tmp_path / "a")
    add_remote(repo, "s3", f"s3://{BUCKET}/no-credentials", s3_endpoint)
    out = push_fails_fast(repo, aws_env(aws_home, credentials=False))
    assert "Unable to locate credentials" in out
