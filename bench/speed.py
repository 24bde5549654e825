"""Speed benchmarks: the Sinkhorn solver against POT, and distillation overhead against plain CE.

    .venv/bin/python bench/speed.py                 # all benchmarks, table + bench/results/speed.json
    .venv/bin/python bench/speed.py --only sinkhorn --repeats 3

Sinkhorn: ``dsink.ot`` (log domain, torch) against POT's ``ot.sinkhorn`` with the torch backend
(``method="sinkhorn_log"``, the log-domain variant, and the default ``"sinkhorn"``) and
``ot.bregman.sinkhorn_log`` on numpy, on the same D-SINK-shaped problems at the same tolerance. The
bound: an N x C problem needs, per log-domain iteration, at least one pass of exp over N*C entries; the script
measures this machine's exp throughput (``torch.exp`` on a large float32 tensor) and reports the
achieved fraction of that bound.

Distillation overhead: seconds per epoch of the D-SINK objective (per-batch Sinkhorn) against plain
cross-entropy, same model, data and batches, measured in one run.

dump: images/s of ``dsink.dump.model_logits`` (what `dump_logits` runs: train + test, chunked, to numpy)
against bare ``model(x)`` over the same pre-normalised tensors, on the pipeline's corrupted set.

dvc: wall time of a no-op ``dvc status`` and ``dvc repro`` on the full pipeline (everything up to date).

memory: peak RSS of dataset-scope Sinkhorn (``class_scaling`` + ``apply_class_scaling``) at
1,000,000 x 100 float32, in a fresh process (the inputs alone are 400 MB each).

stages: seconds per epoch of each training stage on a CIFAR-10-LT-shaped stand-in (synthetic 32x32x3,
10 classes, ratio 100, 12,406 images; the CIFAR archives are not available offline) with the paper's
ResNet-32, for `configs/cifar10_lt_paper.yaml`'s wall-time estimate.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsink import ot as dot  # noqa: E402

PROBLEMS = [(128, 10), (512, 100), (50_000, 100), (1_000_000, 10)]


def problem(n: int, c: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A D-SINK-shaped problem: log-probs of two models and an imbalance teacher's probabilities."""
    g = torch.Generator().manual_seed(seed)
    prior = torch.exp(-torch.arange(c, dtype=torch.float32) * (np.log(100) / max(1, c - 1)))
    lp1 = torch.log_softmax(torch.randn(n, c, generator=g) * 2 + torch.log(prior), 1)
    lp2 = torch.log_softmax(torch.randn(n, c, generator=g) * 2 + torch.log(prior), 1)
    pl = torch.softmax(torch.randn(n, c, generator=g) * 2 + torch.log(prior), 1)
    return lp1, lp2, pl


def timed(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def exp_throughput() -> float:
    """Elements per second of torch.exp on float32 (the compute bound of a log-domain iteration)."""
    x = torch.randn(20_000_000)
    torch.exp(x)
    t, _ = timed(lambda: torch.exp(x), 5)
    return x.numel() / t


def bench_sinkhorn(repeats: int, tol: float, max_iter: int) -> list[dict]:
    import ot

    rows = []
    rate = exp_throughput()
    for n, c in PROBLEMS:
        lp1, lp2, pl = problem(n, c)
        reg = 2.0
        cost = -(lp1 + lp2)  # (n, c)
        r = pl.sum(0).double()
        # POT's conventions: a over classes (r / n), b over samples (1 / n), M = cost^T (c x n)
        a64 = (r / r.sum()).numpy()
        b64 = np.full(n, 1.0 / n)
        M64 = cost.T.double().numpy()
        entry = {"n": n, "c": c, "tol": tol}
        a_t, b_t, M_t = torch.from_numpy(a64).float(), torch.from_numpy(b64).float(), cost.T.contiguous()
        stop = tol / n  # POT's stopThr is on the (1/n-scaled) sample marginal
        runs = {
            "dsink": partial(dot.dsink_targets, lp1, lp2, pl, reg=reg, tol=tol, max_iter=max_iter, log=True),
            "pot_torch": partial(
                ot.sinkhorn,
                a_t,
                b_t,
                M_t,
                reg,
                method="sinkhorn",
                numItermax=max_iter,
                stopThr=stop,
                log=True,
            ),
        }
        if n * c <= 5_000_000:  # POT's log variants materialise several n x c temporaries per iteration
            runs["pot_torch_log"] = partial(
                ot.sinkhorn,
                a_t,
                b_t,
                M_t,
                reg,
                method="sinkhorn_log",
                numItermax=max_iter,
                stopThr=stop,
                log=True,
            )
            runs["pot_numpy_log"] = partial(
                ot.bregman.sinkhorn_log, a64, b64, M64, reg, numItermax=max_iter, stopThr=stop, log=True
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for name, fn in runs.items():
                t, out = timed(fn, 1 if name == "pot_numpy_log" else repeats)
                entry[f"{name}_s"] = t
                info = out[1]
                entry[f"{name}_iters"] = int(info["n_iter"] if name == "dsink" else info.get("niter", -1))
        for name in ("pot_torch_log", "pot_numpy_log"):
            entry.setdefault(f"{name}_s", None)
        # bound: a log-domain iteration exponentiates the n x c log-plan at least once
        entry["bound_s"] = n * c * entry["dsink_iters"] / rate
        entry["fraction_of_bound"] = entry["bound_s"] / entry["dsink_s"]
        for k in ("pot_torch_log_s", "pot_torch_s"):
            entry[f"speedup_vs_{k[:-2]}"] = (entry[k] / entry["dsink_s"]) if entry.get(k) else None
        rows.append(entry)
        print(
            f"{n:>9} x {c:<4} dsink {entry['dsink_s'] * 1e3:9.1f} ms ({entry['dsink_iters']} it)   "
            f"POT torch log {fmt_ms(entry['pot_torch_log_s'])}   POT torch {fmt_ms(entry['pot_torch_s'])}   "
            f"POT numpy log {fmt_ms(entry['pot_numpy_log_s'])}   "
            f"bound fraction {entry['fraction_of_bound']:.2f}",
            flush=True,
        )
    return rows


def fmt_ms(v: float | None) -> str:
    return "      n/a" if v is None else f"{v * 1e3:9.1f} ms"


def bench_overhead(epochs: int) -> dict:
    """Seconds per epoch: D-SINK objective vs plain CE on the same synthetic long-tailed set."""
    from dsink import losses
    from dsink.data.sources import synthetic
    from dsink.data.views import Normalizer, TrainingSet
    from dsink.distill import DsinkObjective
    from dsink.engine import Runtime, train
    from dsink.models import build_model
    from dsink.params import DistillParams

    src = synthetic(10, 28, 1, 1000, 10)
    ids = np.arange(len(src.train), dtype=np.int64)
    ts = TrainingSet(src.train, ids, torch.from_numpy(src.train.labels), "synthetic", src.image_size)
    norm = Normalizer.for_source(src)
    g = np.random.default_rng(0)
    zn = g.normal(size=(ids.size, 10)).astype(np.float32)
    zl = g.normal(size=(ids.size, 10)).astype(np.float32)
    p = DistillParams(epochs=epochs, batch_size=128, track_every=0, scope="batch", class_totals="soft")
    obj = DsinkObjective(p, zn, zl, src.train.labels)
    out = {}
    runs = (("ce", lambda z, y, r, e: losses.cross_entropy(z, y)), ("dsink", obj))
    for _ in range(2):  # interleaved, best of two: the first run also pays one-off warm-up costs
        for name, fn in runs:
            torch.manual_seed(0)
            t = time.perf_counter()
            train(build_model("small_cnn", 10, 1), fn, ts, norm, p, 0, Runtime(torch.device("cpu")))
            per_epoch = (time.perf_counter() - t) / epochs
            out[f"{name}_s_per_epoch"] = min(out.get(f"{name}_s_per_epoch", float("inf")), per_epoch)
    out["ratio"] = out["dsink_s_per_epoch"] / out["ce_s_per_epoch"]
    print(
        f"distill overhead: CE {out['ce_s_per_epoch']:.2f} s/epoch, D-SINK {out['dsink_s_per_epoch']:.2f} "
        f"s/epoch, ratio {out['ratio']:.3f}",
        flush=True,
    )
    return out


def bench_dump(repeats: int) -> dict:
    """images/s: dump's chunked inference (train + test) vs bare model calls on the same tensors."""
    from dsink.dump import model_logits
    from dsink.models import build_model
    from dsink.params import load_params
    from dsink.runs import open_corpus

    params = load_params("params.yaml")
    corpus = open_corpus(params, "data/corrupted/train.parquet")
    model = build_model("small_cnn", corpus.index.num_classes, corpus.source.channels).eval()
    bs = params.dump.batch_size
    n_images = corpus.index.sample_id.size + len(corpus.source.test)
    t_dump, _ = timed(lambda: model_logits(model, corpus, bs, "bench"), repeats)
    dev = torch.device("cpu")
    ids = torch.from_numpy(corpus.index.sample_id)
    x_all = torch.cat(
        [
            corpus.normalizer(corpus.source.train.images[ids], dev),
            corpus.normalizer(corpus.source.test.images, dev),
        ]
    )

    def bare() -> None:
        with torch.inference_mode():
            for start in range(0, x_all.shape[0], bs):
                model(x_all[start : start + bs])

    t_bare, _ = timed(bare, repeats)
    out = {
        "images": n_images,
        "batch_size": bs,
        "dump_images_per_s": n_images / t_dump,
        "bare_images_per_s": n_images / t_bare,
        "ratio": t_bare / t_dump,
    }
    print(
        f"dump: {out['dump_images_per_s']:,.0f} images/s vs bare inference {out['bare_images_per_s']:,.0f} "
        f"images/s (ratio {out['ratio']:.2f})",
        flush=True,
    )
    return out


def bench_dvc(repeats: int) -> dict:
    """Wall time of no-op `dvc status` / `dvc repro` (the pipeline must be up to date)."""
    import subprocess

    dvc = str(Path(sys.executable).with_name("dvc"))
    out = {}
    for cmd in (["status"], ["repro"]):
        t, res = timed(lambda c=cmd: subprocess.run([dvc, *c], capture_output=True, text=True), repeats)
        if res.returncode != 0 or "Running stage" in res.stdout:
            raise SystemExit(f"dvc {cmd[0]} is not a no-op here: bring the pipeline up to date first")
        out[f"{cmd[0]}_s"] = t
    print(f"dvc no-op: status {out['status_s']:.2f} s, repro {out['repro_s']:.2f} s", flush=True)
    return out


_MEMORY_CHILD = """
import sys, torch
sys.path.insert(0, {root!r})
from dsink import ot

def rss(field):  # kB -> bytes, from /proc/self/status (VmRSS: now, VmHWM: peak since the last reset)
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

n, c = {n}, {c}
g = torch.Generator().manual_seed(0)
log_k = torch.log_softmax(torch.randn(n, c, generator=g), 1).div_(2)
p_l = torch.softmax(torch.randn(n, c, generator=g), 1)
r = p_l.sum(0)
del p_l
inputs = rss("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # reset the peak to the current RSS
log_u = ot.class_scaling(log_k, r, tol=1e-4, chunk_size=65536)
q = ot.apply_class_scaling(log_k, log_u)
print(inputs, rss("VmHWM"))
"""


def bench_memory(n: int = 1_000_000, c: int = 100) -> dict:
    """Peak RSS (ru_maxrss) of dataset-scope Sinkhorn at n x c, in a fresh process."""
    import subprocess

    code = _MEMORY_CHILD.format(root=str(Path(__file__).resolve().parents[1]), n=n, c=c)
    t = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t
    inputs, peak = (int(v) for v in res.stdout.split())
    nc_bytes = n * c * 4
    out = {
        "n": n,
        "c": c,
        "wall_s": wall,
        "rss_after_inputs_mb": inputs / 2**20,
        "peak_rss_mb": peak / 2**20,
        "growth_over_inputs_mb": (peak - inputs) / 2**20,
        "n_x_c_float32_mb": nc_bytes / 2**20,
    }
    print(
        f"memory {n:,} x {c}: peak RSS {out['peak_rss_mb']:.0f} MB; with inputs "
        f"{out['rss_after_inputs_mb']:.0f} MB; solve + q added {out['growth_over_inputs_mb']:.0f} MB "
        f"(q itself: {out['n_x_c_float32_mb']:.0f} MB)",
        flush=True,
    )
    return out


def bench_stages(epochs: int) -> dict:
    """Seconds per epoch of teacher / student training with ResNet-32 on a CIFAR-10-LT-shaped set."""
    from dsink.data.longtail import class_counts
    from dsink.data.sources import synthetic
    from dsink.data.views import Normalizer, TrainingSet
    from dsink.distill import DsinkObjective
    from dsink.engine import Runtime, train
    from dsink.models import build_model
    from dsink.params import DistillParams, ImbalanceTeacherParams

    counts = class_counts("exp", 100.0, 5000, 10)
    src = synthetic(10, 32, 3, 5000, 10)
    labels = src.train.labels
    ids = np.concatenate([np.flatnonzero(labels == k)[: counts[k]] for k in range(10)]).astype(np.int64)
    ts = TrainingSet(src.train, ids, torch.from_numpy(labels[ids]), "cifar10", src.image_size)
    norm = Normalizer.for_source(src)
    out: dict = {"images": int(ids.size), "epochs": epochs, "model": "resnet32"}
    tp = ImbalanceTeacherParams(model="resnet32", epochs=epochs, batch_size=128, track_every=0, augment=True)
    rt = Runtime(torch.device("cpu"))
    lp = torch.zeros(10)
    from dsink import losses

    torch.manual_seed(0)
    t = time.perf_counter()
    train(
        build_model("resnet32", 10, 3),
        lambda z, y, r, e: losses.logit_adjusted_ce(z, y, lp),
        ts,
        norm,
        tp,
        0,
        rt,
    )
    out["teacher_s_per_epoch"] = (time.perf_counter() - t) / epochs
    g = np.random.default_rng(0)
    zn = g.normal(size=(ids.size, 10)).astype(np.float32)
    zl = g.normal(size=(ids.size, 10)).astype(np.float32)
    dp = DistillParams(
        model="resnet32",
        epochs=epochs,
        batch_size=128,
        track_every=0,
        augment=True,
        scope="batch",
        class_totals="soft",
    )
    obj = DsinkObjective(dp, zn, zl, labels[ids])
    torch.manual_seed(0)
    t = time.perf_counter()
    train(build_model("resnet32", 10, 3), obj, ts, norm, dp, 0, rt)
    out["student_batch_scope_s_per_epoch"] = (time.perf_counter() - t) / epochs
    print(
        f"ResNet-32, {ids.size:,} CIFAR-shaped images: teacher {out['teacher_s_per_epoch']:.1f} s/epoch, "
        f"student (batch scope) {out['student_batch_scope_s_per_epoch']:.1f} s/epoch",
        flush=True,
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--only", choices=("sinkhorn", "overhead", "dump", "dvc", "memory", "stages"), default=None
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tol", type=float, default=1e-4, help="row-marginal tolerance (POT gets tol / n)")
    ap.add_argument("--max-iter", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--out", default="bench/results/speed.json")
    args = ap.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    result = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "date": time.strftime("%Y-%m-%d"),
    }
    if args.only in (None, "sinkhorn"):
        result["sinkhorn"] = bench_sinkhorn(args.repeats, args.tol, args.max_iter)
    if args.only in (None, "overhead"):
        result["overhead"] = bench_overhead(args.epochs)
    if args.only in (None, "dump"):
        result["dump"] = bench_dump(args.repeats)
    if args.only in (None, "dvc"):
        result["dvc"] = bench_dvc(args.repeats)
    if args.only in (None, "memory"):
        result["memory"] = bench_memory()
    if args.only in (None, "stages"):
        result["stages"] = bench_stages(args.epochs)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
