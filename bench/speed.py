"""Speed benchmarks: the Sinkhorn solver against POT, and distillation overhead against plain CE.

    .venv/bin/python bench/speed.py                 # all benchmarks, table + bench/results/speed.json
    OMP_NUM_THREADS=1 .venv/bin/python bench/speed.py --only sinkhorn --repeats 5 --repeats-big 1

Sinkhorn: ``dsink.ot``'s three solvers (``dsink_targets``, ``class_scaling`` + ``apply_class_scaling``,
``sinkhorn``) against POT's torch backend (``ot.sinkhorn`` with ``method="sinkhorn_log"``, log domain, and
``"sinkhorn"``, scaling domain) on the same D-SINK-shaped float32 problems (samples x classes, cost
``-(log f_N + log f)``, reg 2), one torch thread. Two measurements:

* time per iteration: a fixed 50 iterations, no stopping (ours ``tol=0``, POT ``stopThr=0``), best time / 50;
* time to tolerance under one stopping rule: a solver has converged when *our* measure of its output, the
  larger relative error of the sample masses and of the class totals (``dsink.ot.relative_marginal_error``,
  summed in float64), is ``<= --tol``. Ours stop on that rule themselves. POT checks its own (L2) rule at
  iterations 1, 11, 21, ...; the script continues POT's iterate (``warmstart``) to the first of those check
  points where the measure is met, then times a fresh POT run of exactly that many iterations. POT is
  reported as not reaching it when ``MAX_ITER`` iterations or ``--search-budget`` seconds pass first.

"One exp pass" is the time of one ``torch.exp`` over n x c at this machine's measured throughput, the
least a log-domain iteration can cost.

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
import math
import os
import platform
import sys
import time
import warnings
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


def bench_sinkhorn(
    repeats: int, repeats_big: int, tol: float, search_budget_s: float, sizes: list[tuple[int, int]]
) -> list[dict]:
    """Per-iteration cost and matched time to tolerance; see the module docstring."""
    torch.set_num_threads(1)
    rate = exp_throughput()
    rows = []
    for n, c in sizes:
        reps = repeats_big if n * c >= 5_000_000 else repeats
        entry = sinkhorn_entry(n, c, reps, tol, search_budget_s)
        # bound: a log-domain iteration exponentiates the n x c log-plan at least once
        entry["exp_pass_ms"] = 1e3 * n * c / rate
        rows.append(entry)
        print(
            f"{n:>9} x {c:<4} ms/iteration: "
            + ", ".join(f"{s} {entry[f'{s}_ms_per_iter']:.3g}" for s in SOLVERS)
            + f" (one exp pass {entry['exp_pass_ms']:.3g})\n"
            + "               to tol: "
            + ", ".join(
                f"{s} {fmt_ms(entry[f'{s}_s'])} ({entry[f'{s}_iters']} it, err {entry[f'{s}_err']:.1e})"
                for s in SOLVERS
            ),
            flush=True,
        )
    print(markdown_table(rows))
    return rows


def sinkhorn_entry(n: int, c: int, reps: int, tol: float, search_budget_s: float) -> dict:
    """One problem size: every solver's time per iteration and its matched time to ``tol``."""
    import ot

    lp1, lp2, pl = problem(n, c)
    reg = 2.0
    cost = -(lp1 + lp2)  # (n, c): samples x classes, POT's M with a over samples, b over classes
    log_k = (lp1 + lp2) / reg
    r = pl.double().sum(0)
    r_n = r * (n / r.sum())  # class totals, summing to n
    a = torch.full((n,), 1.0 / n)
    b = (r / r.sum()).float()
    ones = torch.ones(n, dtype=torch.float64)

    def measured(q: torch.Tensor) -> float:
        """Our stopping measure on q (rows: mass 1 per sample), summed in float64: the larger of the
        rows' and the class totals' relative errors."""
        rows_err = dot.relative_marginal_error(q.sum(1, dtype=torch.float64), ones).item()
        return max(rows_err, dot.relative_marginal_error(q.sum(0, dtype=torch.float64), r_n).item())

    def run_dsink(it: int, t: float) -> tuple[torch.Tensor, int]:
        q, info = dot.dsink_targets(lp1, lp2, pl, reg=reg, max_iter=it, tol=t, log=True)
        return q, info["n_iter"]

    def run_class_scaling(it: int, t: float, apply: bool = True) -> tuple[torch.Tensor | None, int]:
        log_u, info = dot.class_scaling(log_k, r, max_iter=it, tol=t, log=True)
        return (dot.apply_class_scaling(log_k, log_u) if apply else None), info["n_iter"]

    def run_sinkhorn(it: int, t: float) -> tuple[torch.Tensor, int]:
        plan, info = dot.sinkhorn(a, b, cost, reg, max_iter=it, tol=t, log=True)
        return plan.mul_(n), info["n_iter"]

    def run_pot(method: str, it: int, warmstart=None, log: bool = False):
        return ot.sinkhorn(
            a,
            b,
            cost,
            reg,
            method=method,
            numItermax=it,
            stopThr=0.0,
            warn=False,
            log=log,
            warmstart=warmstart,
        )

    entry: dict = {"n": n, "c": c, "tol": tol, "repeats": reps, "fixed_iters": FIXED_ITERS}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # (1) time per iteration: FIXED_ITERS iterations, no stopping
        per_iter = {
            "dsink_targets": lambda: run_dsink(FIXED_ITERS, 0.0),
            "class_scaling": lambda: run_class_scaling(FIXED_ITERS, 0.0, apply=False),
            "sinkhorn": lambda: run_sinkhorn(FIXED_ITERS, 0.0),
            "pot_sinkhorn_log": lambda: run_pot("sinkhorn_log", FIXED_ITERS),
            "pot_sinkhorn": lambda: run_pot("sinkhorn", FIXED_ITERS),
        }
        for name, fn in per_iter.items():
            t, _ = timed(fn, reps)
            entry[f"{name}_ms_per_iter"] = 1e3 * t / FIXED_ITERS
        # (2) time to tolerance: ours stop on their own rule at tol ...
        to_tol = {"dsink_targets": run_dsink, "class_scaling": run_class_scaling, "sinkhorn": run_sinkhorn}
        for name, fn in to_tol.items():
            t, (q, iters) = timed(lambda fn=fn: fn(MAX_ITER, tol), reps)
            entry[f"{name}_iters"] = iters
            entry[f"{name}_s"] = t
            entry[f"{name}_err"] = measured(q)
            del q
        # ... POT at the first of its check points (1, 11, 21, ...) where our measure of its plan is met
        for method in ("sinkhorn_log", "sinkhorn"):
            name = f"pot_{method}"
            k, err, ws, start = 0, math.inf, None, time.perf_counter()
            while time.perf_counter() - start < search_budget_s and k < MAX_ITER:
                step = 1 if k == 0 else 10
                plan, info = run_pot(method, step, warmstart=ws, log=True)
                k += step
                err = measured(plan.mul_(n))
                del plan
                if err <= tol:
                    break
                if method == "sinkhorn_log":
                    ws = (info["log_u"], info["log_v"])
                else:
                    ws = (torch.log(info["u"]), torch.log(info["v"]))
            entry[f"{name}_err"] = err
            if err <= tol:
                t, _ = timed(lambda m=method, k=k: run_pot(m, k), reps)
                entry[f"{name}_iters"], entry[f"{name}_s"] = k, t
            else:
                entry[f"{name}_iters"], entry[f"{name}_s"] = None, None
                entry[f"{name}_searched_iters"] = k
    return entry


FIXED_ITERS = 50
MAX_ITER = 1000
SOLVERS = ("dsink_targets", "class_scaling", "sinkhorn", "pot_sinkhorn_log", "pot_sinkhorn")
LABELS = {
    "dsink_targets": "`dsink_targets`",
    "class_scaling": "`class_scaling` (+ `apply_class_scaling`)",
    "sinkhorn": "`sinkhorn`",
    "pot_sinkhorn_log": "POT torch `sinkhorn_log`",
    "pot_sinkhorn": "POT torch `sinkhorn`",
}


def fmt_ms(v: float | None) -> str:
    return "n/a" if v is None else f"{v * 1e3:,.1f} ms"


def markdown_table(rows: list[dict]) -> str:
    """The Sinkhorn table of BENCHMARKS.md."""
    out = [
        "| n x c | solver | ms / iteration (50 it.) | iterations to tol | time to tol | measured error |",
        "|---|---|---|---|---|---|",
    ]
    for e in rows:
        size = f"{e['n']:,} x {e['c']}"
        for s in SOLVERS:
            iters = e[f"{s}_iters"]
            if iters is None:
                it_txt = f"not reached in {e[f'{s}_searched_iters']}"
                t_txt = "n/a"
            else:
                it_txt, t_txt = str(iters), fmt_ms(e[f"{s}_s"])
            ms = e[f"{s}_ms_per_iter"]
            out.append(f"| {size} | {LABELS[s]} | {ms:,.2f} | {it_txt} | {t_txt} | {e[f'{s}_err']:.1e} |")
    return "\n".join(out)


def bench_overhead(epochs: int) -> dict:
    """Seconds per epoch: D-SINK objective vs plain CE on the same synthetic long-tailed set."""
    from dsink import losses
    from dsink.data.sources import synthetic
    from dsink.data.views import Normalizer, TrainingSet
    from dsink.distill import DsinkObjective
    from dsink.engine import train
    from dsink.models import build_model
    from dsink.params import DistillParams
    from dsink.runtime import Runtime

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
    from dsink.engine import train
    from dsink.models import build_model
    from dsink.params import DistillParams, ImbalanceTeacherParams
    from dsink.runtime import Runtime

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


def cpu_model() -> str:
    """``lscpu``'s model name (or /proc/cpuinfo's), for the record."""
    import subprocess

    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def pot_version() -> str | None:
    try:
        import ot

        return ot.__version__
    except ImportError:
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--only", choices=("sinkhorn", "overhead", "dump", "dvc", "memory", "stages"), default=None
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--repeats-big", type=int, default=1, help="repeats at n * c >= 5e6 (sinkhorn)")
    ap.add_argument("--tol", type=float, default=1e-4, help="relative per-entry marginal tolerance")
    ap.add_argument("--search-budget", type=float, default=60.0, help="seconds per POT iteration search")
    ap.add_argument(
        "--sizes", default=",".join(f"{n}x{c}" for n, c in PROBLEMS), help="sinkhorn problem sizes, NxC,..."
    )
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--out", default="bench/results/speed.json")
    args = ap.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    result = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "cpu_model": cpu_model(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numpy": np.__version__,
            "pot": pot_version(),
            "threads": 1 if args.only == "sinkhorn" else torch.get_num_threads(),
        },
        "date": time.strftime("%Y-%m-%d"),
    }
    if args.only in (None, "sinkhorn"):
        sizes = [tuple(int(v) for v in size.split("x")) for size in args.sizes.split(",")]
        result["sinkhorn"] = bench_sinkhorn(
            args.repeats, args.repeats_big, args.tol, args.search_budget, sizes
        )
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
