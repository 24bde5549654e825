"""Accuracy grid: does D-SINK beat the alternatives on long-tailed, noisy Fashion-MNIST?

Every cell is a DVC experiment of the project's own pipeline (`dvc exp run --queue -S ...`), so every
number traces to an experiment that `dvc exp show` lists and `dvc exp apply` restores. One experiment
trains all five models on the same corrupted set with the same backbone, epochs and precision: the
imbalance teacher (logit adjustment), the noise teacher (small-loss selection), plain cross-entropy and
GCE on logit-adjusted logits (`train_baseline@*`), and the D-SINK student; `evaluate` adds the average of
the two teachers' probabilities.

    python bench/accuracy.py queue --epochs 6         # queue the grid (names acc-r<ratio>-<noise>-s<seed>)
    python bench/accuracy.py start --jobs 2           # run the queue (workers inherit this environment)
    python bench/accuracy.py collect                  # table + bench/results/accuracy.json

`collect` reads finished experiments only (`dvc exp show --json`) and reports mean and spread (sample
standard deviation) over seeds, so it can be rerun while the queue drains.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
DVC = str(VENV_BIN / "dvc")
PREFIX = "acc"

# (label, data.noise.type, data.noise.rate): the settings of issue #6
NOISE_SETTINGS = (
    ("sym0.2", "symmetric", 0.2),
    ("sym0.4", "symmetric", 0.4),
    ("asym0.2", "asymmetric", 0.2),
    ("imb0.4", "imbalanced", 0.4),
)
TRAININGS = ("teachers.imbalance", "teachers.noise", "baselines.ce", "baselines.la_gce", "distill")
METHODS = (
    ("ce", "plain CE"),
    ("imbalance_teacher", "imbalance teacher (LA)"),
    ("noise_teacher", "noise teacher (small-loss)"),
    ("la_gce", "LA + GCE (one loss)"),
    ("teacher_average", "teacher average"),
    ("dsink", "D-SINK"),
)
SINGLE = ("ce", "imbalance_teacher", "noise_teacher", "la_gce", "teacher_average")


def exp_name(ratio: int, noise: str, seed: int) -> str:
    return f"{PREFIX}-r{ratio}-{noise}-s{seed}"


def grid(ratios: list[int], seeds_at_100: list[int], seeds_else: list[int]) -> list[tuple[int, tuple, int]]:
    cells = []
    for ratio in ratios:
        for setting in NOISE_SETTINGS:
            for seed in seeds_at_100 if ratio == 100 else seeds_else:
                cells.append((ratio, setting, seed))
    return cells


def overrides(ratio: int, setting: tuple, seed: int, epochs: int, fast: bool, root: str) -> list[str]:
    _, kind, rate = setting
    sets = [
        f"seed={seed}",
        "data.dataset=fashion_mnist",
        # queued experiments run in a temporary copy of the repo without the (git-ignored) raw data
        f"data.root={root}",
        f"data.imbalance.ratio={ratio}",
        f"data.noise.type={kind}",
        f"data.noise.rate={rate}",
        # small-loss selection ramps its forget rate over the first half of training, as by default
        f"teachers.noise.ramp_epochs={max(1, epochs // 2)}",
    ]
    for sec in TRAININGS:
        sets += [f"{sec}.epochs={epochs}", f"{sec}.track_every=0"]
        if fast:
            sets += [f"{sec}.bf16=auto", f"{sec}.channels_last=auto"]
    return sets


def worker_env(threads: int) -> dict[str, str]:
    """What queue workers need: this venv's dvc and python, quiet progress, a git identity."""
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["DSINK_PYTHON"] = sys.executable
    env["TQDM_DISABLE"] = "1"
    env.setdefault("OMP_NUM_THREADS", str(threads))
    for k in ("GIT_AUTHOR", "GIT_COMMITTER"):
        env.setdefault(f"{k}_NAME", "dsink-bench")
        env.setdefault(f"{k}_EMAIL", "bench@dsink.invalid")
    return env


def cmd_queue(args: argparse.Namespace) -> None:
    cells = grid(args.ratios, args.seeds, args.seeds_other)
    for ratio, setting, seed in cells:
        name = exp_name(ratio, setting[0], seed)
        sets = overrides(ratio, setting, seed, args.epochs, not args.fp32, str(Path(args.root).resolve()))
        cmd = [DVC, "exp", "run", "--queue", "-n", name] + [a for s in sets for a in ("-S", s)]
        subprocess.run(cmd, cwd=ROOT, check=True, env=worker_env(1), stdout=subprocess.DEVNULL)
        print(f"queued {name}")
    print(f"{len(cells)} experiments queued; run: python bench/accuracy.py start --jobs N")


def cmd_start(args: argparse.Namespace) -> None:
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    env = worker_env(threads)
    start = time.time()
    subprocess.run([DVC, "queue", "start", "-j", str(args.jobs)], cwd=ROOT, check=True, env=env)
    if not args.wait:
        return
    while True:
        out = subprocess.run([DVC, "queue", "status"], cwd=ROOT, env=env, capture_output=True, text=True)
        busy = [ln for ln in out.stdout.splitlines() if " Running " in ln or " Queued " in ln]
        if not busy:
            break
        time.sleep(30)
    print(f"queue drained in {time.time() - start:.0f} s")


def _experiments(node: Any) -> list[dict[str, Any]]:
    """Every experiment record (a dict with ``name`` and ``data``) in ``dvc exp show --json`` output."""
    found: list[dict[str, Any]] = []
    if isinstance(node, list):
        for item in node:
            found += _experiments(item)
    elif isinstance(node, dict):
        if node.get("name") and isinstance(node.get("data"), dict):
            found.append(node)
        for key in ("experiments", "revs"):
            found += _experiments(node.get(key) or [])
    return found


def _load(prefix: str) -> dict[str, dict[str, Any]]:
    out = subprocess.run(
        [DVC, "exp", "show", "--json", "-A"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    runs = {}
    for exp in _experiments(json.loads(out)):
        name = exp["name"]
        if not name.startswith(prefix + "-"):
            continue
        data = exp["data"]
        metrics = ((data.get("metrics") or {}).get("metrics/evaluate.json") or {}).get("data")
        corrupt = ((data.get("metrics") or {}).get("metrics/corrupt.json") or {}).get("data")
        params = ((data.get("params") or {}).get("params.yaml") or {}).get("data")
        if metrics and params and "ce" in metrics:
            runs[name] = {"rev": exp.get("rev"), "metrics": metrics, "corrupt": corrupt, "params": params}
    return runs


def _stat(values: list[float]) -> dict[str, Any]:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"mean": None, "std": None, "n": 0}
    std = statistics.stdev(vals) if len(vals) > 1 else None
    return {"mean": statistics.fmean(vals), "std": std, "n": len(vals)}


def summarise(runs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (ratio, noise setting): each method's top1/many/medium/few/corrected over seeds."""
    cells: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for name, run in runs.items():
        _, r, noise, s = name.split("-")
        cells.setdefault((int(r[1:]), noise), []).append({"seed": int(s[1:]), **run})
    order = {label: i for i, (label, _, _) in enumerate(NOISE_SETTINGS)}
    rows = []
    for (ratio, noise), seeds in sorted(cells.items(), key=lambda kv: (-kv[0][0], order.get(kv[0][1], 99))):
        seeds.sort(key=lambda r: r["seed"])
        row: dict[str, Any] = {
            "ratio": ratio,
            "noise": noise,
            "seeds": [r["seed"] for r in seeds],
            "experiments": {f"{PREFIX}-r{ratio}-{noise}-s{r['seed']}": r["rev"] for r in seeds},
            "epochs": seeds[0]["params"]["distill"]["epochs"],
            "bf16": seeds[0]["params"]["distill"]["bf16"],
            "realised_noise": _stat([r["corrupt"]["noise_rate"] for r in seeds if r["corrupt"]]),
            "methods": {},
        }
        for key, _ in METHODS:
            row["methods"][key] = {
                m: _stat([r["metrics"][key].get(m) for r in seeds])
                for m in ("top1", "many", "medium", "few", "corrected")
            }
        best_single = max(SINGLE, key=lambda k: row["methods"][k]["top1"]["mean"])
        row["best_single"] = best_single
        row["dsink_margin_over_best_single"] = (
            row["methods"]["dsink"]["top1"]["mean"] - row["methods"][best_single]["top1"]["mean"]
        )
        # paired by seed (same corrupted set): the spread of the margin itself, not of each method
        row["dsink_paired_margin"] = _stat(
            [r["metrics"]["dsink"]["top1"] - r["metrics"][best_single]["top1"] for r in seeds]
        )
        top1 = {k: row["methods"][k]["top1"]["mean"] for k in ("dsink", "ce")}
        row["dsink_margin_over_ce"] = top1["dsink"] - top1["ce"]
        rows.append(row)
    return rows


def _pct(s: dict[str, Any]) -> str:
    if s["mean"] is None:
        return "n/a"
    text = f"{100 * s['mean']:.2f}"
    return text + (f" ± {100 * s['std']:.2f}" if s["std"] is not None else "")


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = []
    labels = " | ".join(label for _, label in METHODS)
    head = f"| ratio | noise | seeds | {labels} | D-SINK - best single (paired by seed) |"
    lines += [head, "|" + "---|" * (len(METHODS) + 4)]
    for row in rows:
        cells = [_pct(row["methods"][k]["top1"]) for k, _ in METHODS]
        paired = row["dsink_paired_margin"]
        spread = f" ± {100 * paired['std']:.2f}" if paired["std"] is not None else ""
        margin = f"{100 * row['dsink_margin_over_best_single']:+.2f}{spread} ({row['best_single']})"
        lead = f"| {row['ratio']} | {row['noise']} | {len(row['seeds'])} | "
        lines.append(lead + " | ".join(cells) + f" | {margin} |")
    lines += ["", "Few-shot / many-shot top-1 and share of noisy training labels corrected:", ""]
    cols = " | ".join(f"{lbl} few / many / corrected" for k, lbl in METHODS if k != "teacher_average")
    lines += [f"| ratio | noise | {cols} |"]
    lines += ["|" + "---|" * (len(METHODS) + 1)]
    for row in rows:
        cells = []
        for k, _ in METHODS:
            if k == "teacher_average":
                continue
            m = row["methods"][k]
            cells.append(f"{_pct(m['few'])} / {_pct(m['many'])} / {_pct(m['corrected'])}")
        lines.append(f"| {row['ratio']} | {row['noise']} | " + " | ".join(cells) + " |")
    if rows:
        margins = [r["dsink_margin_over_best_single"] for r in rows]
        wins = sum(m > 0 for m in margins)
        lines += [
            "",
            f"D-SINK above the best single method in {wins} of {len(rows)} settings; mean margin "
            f"{100 * statistics.fmean(margins):+.2f} points.",
        ]
    return "\n".join(lines)


def cmd_collect(args: argparse.Namespace) -> None:
    runs = _load(PREFIX)
    rows = summarise(runs)
    text = markdown(rows)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"command": "python bench/accuracy.py collect", "experiments": len(runs), "rows": rows}
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")
    tmp.replace(out)
    print(f"\n{len(runs)} experiments -> {out}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("queue", help="queue the grid as DVC experiments")
    q.add_argument("--epochs", type=int, default=6, help="epochs of every training (all five models)")
    q.add_argument("--ratios", type=int, nargs="+", default=[100, 10], help="imbalance ratios")
    q.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds at ratio 100")
    q.add_argument("--seeds-other", type=int, nargs="+", default=[0], help="seeds at other ratios")
    q.add_argument("--root", default=str(ROOT / "data/raw"), help="Fashion-MNIST root (made absolute)")
    q.add_argument("--fp32", action="store_true", help="plain float32 (default: bf16, channels_last auto)")
    q.set_defaults(fn=cmd_queue)
    s = sub.add_parser("start", help="start queue workers")
    s.add_argument("--jobs", type=int, default=1, help="parallel workers (threads split between them)")
    s.add_argument("--wait", action="store_true", help="return when the queue is empty")
    s.set_defaults(fn=cmd_start)
    c = sub.add_parser("collect", help="table of finished experiments")
    c.add_argument("--out", default=str(ROOT / "bench/results/accuracy.json"))
    c.set_defaults(fn=cmd_collect)
    args = p.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()
