"""Speed benchmarks: the Sinkhorn solver against POT, and distillation overhead against plain CE.

    .venv/bin/python bench/speed.py                 # all benchmarks, table + bench/results/speed.json
    .venv/bin/python bench/speed.py --only sinkhorn --repeats 3

Sinkhorn: ``dsink.ot`` (log domain, torch) against POT's ``ot.sinkhorn`` with the torch backend
(``method="sinkhorn_log"``, the log-domain variant, and the default ``"sinkhorn"``) and
``ot.bregman.sinkhorn_log`` on numpy, on the same D-SINK-shaped problems at the same tolerance. The
bound: an N x C problem needs, per iteration, at least two passes of exp over N*C entries; the script
measures this machine's exp throughput (``torch.exp`` on a large float32 tensor) and reports the
achieved fraction of that bound.

Distillation overhead: seconds per epoch of the D-SINK objective (per-batch Sinkhorn) against plain
cross-entropy, same model, data and batches, measured in one run.
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
                ot.sinkhorn, a_t, b_t, M_t, reg, method="sinkhorn", numItermax=max_iter, stopThr=stop
            ),
        }
        if n * c <= 5_000_000:  # POT's log variants materialise several n x c temporaries per iteration
            runs["pot_torch_log"] = partial(
                ot.sinkhorn, a_t, b_t, M_t, reg, method="sinkhorn_log", numItermax=max_iter, stopThr=stop
            )
            runs["pot_numpy_log"] = partial(
                ot.bregman.sinkhorn_log, a64, b64, M64, reg, numItermax=max_iter, stopThr=stop
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for name, fn in runs.items():
                t, out = timed(fn, 1 if name == "pot_numpy_log" else repeats)
                entry[f"{name}_s"] = t
                if name == "dsink":
                    entry["dsink_iters"] = int(out[1]["n_iter"])
        for name in ("pot_torch_log", "pot_numpy_log"):
            entry.setdefault(f"{name}_s", None)
        # bound: 2 exp passes of n*c per iteration
        entry["bound_s"] = 2 * n * c * entry["dsink_iters"] / rate
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
    p = DistillParams(epochs=epochs, batch_size=128, track_every=0)
    obj = DsinkObjective(p, zn, zl, np.full(10, 0.1))
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=("sinkhorn", "overhead"), default=None)
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
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
