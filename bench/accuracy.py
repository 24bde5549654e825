"""Accuracy grid: does D-SINK beat the alternatives on long-tailed, noisy Fashion-MNIST?

Every cell is a DVC experiment of the project's own pipeline (`dvc exp run --queue -S ...`), so every
number traces to an experiment that `dvc exp show` lists and `dvc exp apply` restores. One experiment
trains every model on the same corrupted set with the same backbone, epochs and precision: the
imbalance teacher, the noise teacher, plain cross-entropy and the one-model baseline (logit-adjusted CE
with class-aware small-loss selection, `train_baseline@*`), and the D-SINK student; `evaluate` adds the
average of the two teachers' probabilities. The methods' own settings are those of params.yaml (the
defaults chosen on the validation split); a regime sets only the data, the backbone and the schedule.

Three regimes (`--regime`):

  memorising   (names mem-r<ratio>-<noise>-s<seed>) the `mlp` backbone on raw pixels, 60 epochs, no
               augmentation: plain CE memorises the noisy labels (its per-epoch test curve is tracked, so
               `collect` reports its best epoch beside its final one and the memorised share).
  memorising_cnn  (names memcnn-r<ratio>-sym0.4-s<seed>) the same long schedule on the convolutional
               `small_cnn` backbone, symmetric 0.4 only (1 hour a cell on a 2-core CPU with AMX, where
               `auto` picks bf16; over 2 hours in fp32 on one without).
  short        (names acc-r<ratio>-<noise>-s<seed>) the `small_cnn` backbone, 6 epochs: nothing has
               time to memorise (the grid of issue #6, rerun with today's defaults).

    python bench/accuracy.py queue --regime memorising          # ratio 100 x 3 seeds, ratio 10 x 1 seed
    python bench/accuracy.py start --jobs 2 --wait              # two workers, one torch thread each
    python bench/accuracy.py collect --regime memorising        # table + bench/results/accuracy_mem.json
    python bench/accuracy.py grid --regime memorising --jobs 2  # the three in one command; its wall
                                                                # time: bench/results/grid_wall_mem.json

`collect` reads finished experiments only (`dvc exp show --json`) and reports mean and spread (sample
standard deviation) over seeds and D-SINK's margin paired by seed, so it can be rerun while the queue
drains. Its JSON keeps each experiment's record (`runs`): `collect --runs-from OLD.json` rebuilds or
extends a table where the experiments' git refs are gone (a fresh clone, another machine).
`start --wait` records the queue's wall time in bench/results/queue_wall.json.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
DVC = str(VENV_BIN / "dvc")

METHODS = (
    ("ce", "plain CE"),
    ("imbalance_teacher", "imbalance teacher (LA)"),
    ("noise_teacher", "noise teacher (small-loss)"),
    ("la_small_loss", "LA + small-loss (one model)"),
    ("teacher_average", "teacher average"),
    ("dsink", "D-SINK"),
)
SINGLE = ("ce", "imbalance_teacher", "noise_teacher", "la_small_loss", "teacher_average")


@dataclass(frozen=True)
class Regime:
    """What a grid fixes besides the data: backbone, schedule, and which noise settings it covers."""

    prefix: str
    model: str
    epochs: int
    augment: bool
    # (label, data.noise.type, data.noise.rate)
    settings: tuple[tuple[str, str, float], ...]
    ce_track_every: int  # plain CE's test curve (best epoch vs final); 0: not tracked
    track_every: int  # the other models' curves
    noise_ramp_half: bool  # small-loss ramps its forget rate over the first half of a short run


REGIMES = {
    "memorising": Regime(
        prefix="mem",
        model="mlp",
        epochs=60,
        augment=False,
        settings=(
            ("sym0.4", "symmetric", 0.4),
            ("sym0.6", "symmetric", 0.6),
            ("asym0.4", "asymmetric", 0.4),
            ("imb0.4", "imbalanced", 0.4),
        ),
        ce_track_every=1,
        track_every=5,
        noise_ramp_half=False,
    ),
    "memorising_cnn": Regime(
        prefix="memcnn",
        model="small_cnn",
        epochs=60,
        augment=False,
        settings=(("sym0.4", "symmetric", 0.4),),
        ce_track_every=1,
        track_every=5,
        noise_ramp_half=False,
    ),
    "short": Regime(
        prefix="acc",
        model="small_cnn",
        epochs=6,
        augment=False,
        settings=(
            ("sym0.2", "symmetric", 0.2),
            ("sym0.4", "symmetric", 0.4),
            ("asym0.2", "asymmetric", 0.2),
            ("imb0.4", "imbalanced", 0.4),
        ),
        ce_track_every=0,
        track_every=0,
        noise_ramp_half=True,
    ),
}
#: every noise setting any regime uses, by label
ALL_SETTINGS = {label: (label, kind, rate) for r in REGIMES.values() for label, kind, rate in r.settings}
PREFIX = REGIMES["short"].prefix


def exp_name(ratio: int, noise: str, seed: int, prefix: str = PREFIX) -> str:
    return f"{prefix}-r{ratio}-{noise}-s{seed}"


def grid(
    ratios: list[int], seeds_at_100: list[int], seeds_else: list[int], regime: Regime = REGIMES["short"]
) -> list[tuple[int, tuple, int]]:
    """Cells ordered so a partial run is useful: every setting at the first seed before the next seed."""
    cells = []
    for ratio in ratios:
        seeds = seeds_at_100 if ratio == 100 else seeds_else
        for seed in seeds:
            for setting in regime.settings:
                cells.append((ratio, setting, seed))
    return cells


def overrides(
    ratio: int,
    setting: tuple,
    seed: int,
    regime: Regime,
    root: str,
    epochs: int | None = None,
    fast: bool = True,
    extra: list[str] | None = None,
) -> list[str]:
    """The ``-S`` overrides of one cell: data, seed, and the regime's backbone and schedule."""
    _, kind, rate = setting
    ep = regime.epochs if epochs is None else epochs
    sets = [
        f"seed={seed}",
        "data.dataset=fashion_mnist",
        # queued experiments run in a temporary copy of the repo without the (git-ignored) raw data
        f"data.root={root}",
        f"data.imbalance.ratio={ratio}",
        f"data.noise.type={kind}",
        f"data.noise.rate={rate}",
    ]
    if regime.noise_ramp_half:
        for sec in ("teachers.noise", "baselines.la_small_loss"):
            sets.append(f"{sec}.ramp_epochs={max(1, ep // 2)}")
    # every model's backbone and schedule, once, in the shared `train` section
    sets += [
        f"train.model={regime.model}",
        f"train.epochs={ep}",
        f"train.augment={str(regime.augment).lower()}",
        f"train.track_every={regime.track_every}",
        # plain CE's own curve: an override params.yaml does not write, so added with `++`
        f"++baselines.ce.track_every={regime.ce_track_every}",
    ]
    if fast:
        sets += ["train.bf16=auto", "train.channels_last=auto"]
    return sets + list(extra or [])


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


def regime_prefix(regime: Regime, tag: str | None) -> str:
    """Experiment-name prefix: the regime's, plus ``_<tag>`` for a variant (e.g. a validation sweep)."""
    return regime.prefix if not tag else f"{regime.prefix}_{tag}"


def cmd_queue(args: argparse.Namespace) -> None:
    regime = REGIMES[args.regime]
    prefix = regime_prefix(regime, args.tag)
    cells = grid(args.ratios, args.seeds, args.seeds_other, regime)
    if args.noise:
        cells = [c for c in cells if c[1][0] in args.noise]
    root = str(Path(args.root).resolve())
    for ratio, setting, seed in cells:
        name = exp_name(ratio, setting[0], seed, prefix)
        sets = overrides(ratio, setting, seed, regime, root, args.epochs, not args.fp32, args.set)
        cmd = [DVC, "exp", "run", "--queue", "-n", name] + [a for s in sets for a in ("-S", s)]
        subprocess.run(cmd, cwd=ROOT, check=True, env=worker_env(1), stdout=subprocess.DEVNULL)
        print(f"queued {name}")
    print(f"{len(cells)} experiments queued; run: python bench/accuracy.py start --jobs N --wait")


def queue_state(line: str) -> str | None:
    """The status column of a ``dvc queue status`` task line (its last word), None for other lines."""
    words = line.split()
    if len(words) < 3 or words[-1] not in ("Queued", "Running", "Success", "Failed", "Killed"):
        return None
    return words[-1]


POLL_S = 30  # seconds between `dvc queue status` polls while waiting


def cmd_start(args: argparse.Namespace) -> None:
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    env = worker_env(threads)
    before = subprocess.run([DVC, "queue", "status"], cwd=ROOT, env=env, capture_output=True, text=True)
    pending = sum(queue_state(ln) in ("Running", "Queued") for ln in before.stdout.splitlines())
    start = time.time()
    launch = [DVC, "queue", "start", "-j", str(args.jobs)]
    subprocess.run(launch, cwd=ROOT, check=True, env=env)
    if not args.wait:
        return
    restarts, short_polls = 0, 0
    while True:
        out = subprocess.run([DVC, "queue", "status"], cwd=ROOT, env=env, capture_output=True, text=True)
        states = [queue_state(ln) for ln in out.stdout.splitlines()]
        running, queued = states.count("Running"), states.count("Queued")
        if not running and not queued:
            break
        # DVC's queue workers can exit while tasks are still queued; `queue start -j N` brings the
        # pool back to N workers. Two polls in a row, so a worker between two tasks is not counted.
        short_polls = short_polls + 1 if queued and running < args.jobs else 0
        if short_polls >= 2:
            subprocess.run(launch, cwd=ROOT, check=True, env=env)
            restarts, short_polls = restarts + 1, 0
            print(f"{running} of {args.jobs} workers running with {queued} queued: restarted", flush=True)
        time.sleep(POLL_S)
    wall = time.time() - start
    failed = sum(queue_state(ln) == "Failed" for ln in out.stdout.splitlines())
    record = {
        "jobs": args.jobs,
        "threads_per_job": threads,
        "wall_s": round(wall, 1),
        "tasks": pending,  # queued or running when this command started
        "failed_in_queue_history": failed,
        "worker_restarts": restarts,
    }
    path = ROOT / "bench/results/queue_wall.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"queue drained in {wall:.0f} s ({pending} tasks; dvc queue status lists any failure)")


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


CE_CURVE = "dvclive/baseline_ce/plots/metrics/test_top1.tsv"


def read_curve(text: str) -> list[tuple[int, float]]:
    """``(step, value)`` rows of a dvclive TSV (columns ``timestamp``, ``step`` and the metric; the
    metric is the last column)."""
    rows = list(csv.reader(io.StringIO(text), delimiter="\t"))
    if not rows or "step" not in rows[0]:
        return []
    head = rows[0]
    si, vi = head.index("step"), len(head) - 1
    return [(int(float(r[si])), float(r[vi])) for r in rows[1:] if len(r) == len(head)]


def git_show(rev: str, path: str) -> str | None:
    """``git show rev:path`` in this repository, or ``None`` where the commit has no such file."""
    out = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, capture_output=True, text=True)
    return out.stdout if out.returncode == 0 else None


def experiment_refs(repo: Path) -> list[tuple[str, str, str]]:
    """``(baseline, name, commit)`` of every finished DVC experiment of ``repo``, oldest first, read from
    DVC's git refs ``refs/exps/<baseline[:2]>/<baseline[2:]>/<name>`` (queue internals such as
    ``refs/exps/celery/...`` are skipped). Queued and running experiments have no such ref yet: `dvc exp
    show` lists them with the workspace's metrics, which must not be mistaken for theirs."""
    out = subprocess.run(
        ["git", "for-each-ref", "--sort=committerdate", "--format=%(objectname) %(refname)", "refs/exps"],
        cwd=repo,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    found = []
    for line in out.splitlines():
        sha, ref = line.split(" ", 1)
        parts = ref.split("/")
        if len(parts) == 5 and re.fullmatch(r"[0-9a-f]{40}", parts[2] + parts[3]):
            found.append((parts[2] + parts[3], parts[4], sha))
    return found


def find_experiments(repo: Path) -> dict[str, str]:
    """Experiment name -> commit of every finished DVC experiment of ``repo`` (a rerun under the same name
    replaces the older one); see :func:`experiment_refs`."""
    return {name: sha for _, name, sha in experiment_refs(repo)}


def require_finished(names: list[str], finished: dict[str, str]) -> None:
    """Refuse (exit with a message) when any of ``names`` is not a finished experiment."""
    unknown = [e for e in names if e not in finished]
    if unknown:
        raise SystemExit(f"not finished experiments: {', '.join(unknown)}")


def _load(prefix: str) -> dict[str, dict[str, Any]]:
    refs = experiment_refs(ROOT)
    finished = {name: sha for _, name, sha in refs}
    # only the commits the prefix's experiments branch from: `dvc exp show -A` reads every commit of the
    # history, minutes on a long one
    baselines = sorted({base for base, name, _ in refs if name.startswith(prefix + "-")})
    if not baselines:
        return {}
    revs = [a for base in baselines for a in ("--rev", base)]
    out = subprocess.run(
        [DVC, "exp", "show", "--json", *revs], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    runs = {}
    for exp in _experiments(json.loads(out)):
        name = exp["name"]
        if not name.startswith(prefix + "-") or finished.get(name) != exp.get("rev"):
            continue
        data = exp["data"]
        metrics = ((data.get("metrics") or {}).get("metrics/evaluate.json") or {}).get("data")
        corrupt = ((data.get("metrics") or {}).get("metrics/corrupt.json") or {}).get("data")
        issues = ((data.get("metrics") or {}).get("metrics/label_issues.json") or {}).get("data")
        params = ((data.get("params") or {}).get("params.yaml") or {}).get("data")
        if metrics and params and "ce" in metrics:
            rev = exp.get("rev") or data.get("rev")
            text = git_show(rev, CE_CURVE) if rev else None
            runs[name] = {
                "rev": rev,
                "metrics": metrics,
                "corrupt": corrupt,
                "label_issues": issues,
                "params": params,
                "ce_curve": read_curve(text) if text else [],
            }
    return runs


def _stat(values: list[float | None]) -> dict[str, Any]:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"mean": None, "std": None, "n": 0}
    std = statistics.stdev(vals) if len(vals) > 1 else None
    return {"mean": statistics.fmean(vals), "std": std, "n": len(vals)}


def _val_top1(m: dict[str, Any]) -> float | None:
    val = m.get("val")
    return val.get("top1") if isinstance(val, dict) else None


def _training_key(params: dict[str, Any], section: str, key: str) -> Any:
    """A model's effective training setting: its section's own value, else the shared ``train`` one."""
    own = params.get(section) or {}
    return own[key] if key in own else (params.get("train") or {}).get(key)


def summarise(runs: dict[str, dict[str, Any]], settings: tuple = ()) -> list[dict[str, Any]]:
    """One row per (ratio, noise setting): each method's metrics over seeds, D-SINK's margins paired by
    seed over the best other method (chosen per cell by mean test top-1), and plain CE's memorisation:
    its memorised share, its best epoch's test top-1 and how far its final epoch fell below it."""
    cells: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for name, run in runs.items():
        prefix, r, noise, s = name.split("-")
        cells.setdefault((int(r[1:]), noise), []).append({"seed": int(s[1:]), "name": name, **run})
    order = {label: i for i, (label, _, _) in enumerate(settings)}
    rows = []
    for (ratio, noise), seeds in sorted(cells.items(), key=lambda kv: (-kv[0][0], order.get(kv[0][1], 99))):
        seeds.sort(key=lambda r: r["seed"])
        first = seeds[0]["params"]
        row: dict[str, Any] = {
            "ratio": ratio,
            "noise": noise,
            "seeds": [r["seed"] for r in seeds],
            "experiments": {r["name"]: r["rev"] for r in seeds},
            "model": _training_key(first, "distill", "model"),
            "epochs": _training_key(first, "distill", "epochs"),
            "realised_noise": _stat([(r["corrupt"] or {}).get("noise_rate") for r in seeds]),
            "noise_rate_estimate": _stat(
                [(r["metrics"].get("noise_rate") or {}).get("estimate") for r in seeds]
            ),
            "methods": {},
        }
        present = [k for k, _ in METHODS if all(k in r["metrics"] for r in seeds)]
        for key in present:
            per = {
                m: _stat([r["metrics"][key].get(m) for r in seeds])
                for m in ("top1", "many", "medium", "few", "corrected", "memorised")
            }
            per["val_top1"] = _stat([_val_top1(r["metrics"][key]) for r in seeds])
            row["methods"][key] = per
        singles = [k for k in SINGLE if k in present]
        if "dsink" in present and singles:
            best = max(singles, key=lambda k: row["methods"][k]["top1"]["mean"])
            row["best_single"] = best
            row["dsink_paired_margin"] = _stat(
                [r["metrics"]["dsink"]["top1"] - r["metrics"][best]["top1"] for r in seeds]
            )
            row["dsink_wins"] = sum(
                r["metrics"]["dsink"]["top1"] > max(r["metrics"][k]["top1"] for k in singles) for r in seeds
            )
            if "ce" in present:
                row["dsink_margin_over_ce"] = _stat(
                    [r["metrics"]["dsink"]["top1"] - r["metrics"]["ce"]["top1"] for r in seeds]
                )
        curves = [r["ce_curve"] for r in seeds if r["ce_curve"]]
        row["ce_best_epoch_top1"] = _stat([max(v for _, v in c) for c in curves])
        row["ce_final_minus_best"] = _stat([c[-1][1] - max(v for _, v in c) for c in curves])
        row["ce_curves"] = {r["name"]: r["ce_curve"] for r in seeds if r["ce_curve"]}
        if all(r.get("label_issues") for r in seeds):
            row["label_issues_f1"] = _stat([r["label_issues"].get("f1") for r in seeds])
        rows.append(row)
    return rows


def _pct(s: dict[str, Any], signed: bool = False) -> str:
    if s["mean"] is None:
        return "n/a"
    text = f"{100 * s['mean']:+.2f}" if signed else f"{100 * s['mean']:.2f}"
    return text + (f" ± {100 * s['std']:.2f}" if s["std"] is not None else "")


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = []
    methods = [(k, lbl) for k, lbl in METHODS if any(k in r["methods"] for r in rows)]
    labels = " | ".join(label for _, label in methods)
    head = f"| ratio | noise | seeds | {labels} | D-SINK - best other (paired by seed) | wins |"
    lines += [head, "|" + "---|" * (len(methods) + 5)]
    na = {"mean": None, "std": None}
    for row in rows:
        cells = [_pct(row["methods"].get(k, {}).get("top1", na)) for k, _ in methods]
        if "dsink_paired_margin" in row:
            margin = f"{_pct(row['dsink_paired_margin'], signed=True)} ({row['best_single']})"
            wins = f"{row['dsink_wins']}/{len(row['seeds'])}"
        else:
            margin, wins = "n/a", "n/a"
        lead = f"| {row['ratio']} | {row['noise']} | {len(row['seeds'])} | "
        lines.append(lead + " | ".join(cells) + f" | {margin} | {wins} |")
    lines += [
        "",
        "Few-shot top-1 per method; validation top-1 of D-SINK; plain CE's memorisation (share of noisy "
        "training labels it predicts, its best epoch's test top-1, final minus best):",
        "",
    ]
    cols = " | ".join(f"{lbl} few" for k, lbl in methods)
    lines += [f"| ratio | noise | {cols} | D-SINK val | CE memorised | CE best epoch | CE final - best |"]
    lines += ["|" + "---|" * (len(methods) + 6)]
    for row in rows:
        cells = [_pct(row["methods"].get(k, {}).get("few", na)) for k, _ in methods]
        dval = row["methods"].get("dsink", {}).get("val_top1", na)
        ce = row["methods"].get("ce", {})
        extra = [
            _pct(dval),
            _pct(ce.get("memorised", na)),
            _pct(row["ce_best_epoch_top1"]),
            _pct(row["ce_final_minus_best"], signed=True),
        ]
        lines.append(f"| {row['ratio']} | {row['noise']} | " + " | ".join(cells + extra) + " |")
    margins = [r["dsink_paired_margin"]["mean"] for r in rows if "dsink_paired_margin" in r]
    if margins:
        wins = sum(m > 0 for m in margins)
        lines += [
            "",
            f"D-SINK above the best other method (mean over seeds) in {wins} of {len(margins)} settings; "
            f"mean paired margin {100 * statistics.fmean(margins):+.2f} points.",
        ]
    return "\n".join(lines)


def with_variant_student(
    runs: dict[str, dict[str, Any]], variants: dict[str, Any], name: str
) -> dict[str, dict[str, Any]]:
    """``runs`` with each experiment's D-SINK metrics replaced by those of the student that
    `bench/distill_variants.py` retrained on the same experiment's teachers as variant ``name`` (its
    ``--out`` JSON, ``variants``). Experiments the variant did not cover are left out, so that every row
    compares the same students; the other methods' metrics stay the experiment's own."""
    rows = [r for r in variants.get("rows", []) if r.get("variant") == name]
    if not rows:
        raise SystemExit(f"the variants file has no variant {name!r}")
    cells: dict[str, Any] = {}
    for r in rows:
        cells.update(r["cells"])
    out = {}
    for exp, run in runs.items():
        student = (cells.get(exp) or {}).get("dsink")
        if student is None:
            continue
        out[exp] = {**run, "metrics": {**run["metrics"], "dsink": student}, "label_issues": None}
    return out


def runs_from(paths: list[str], prefix: str) -> dict[str, dict[str, Any]]:
    """The experiment records (``runs``) that earlier ``collect`` calls stored in their JSON, restricted to
    the names of ``prefix``; a later file's record of a name replaces an earlier one's.

    DVC keeps experiments as git refs of the repository that ran them: a fresh clone, or a machine that
    did not run them, has none, so a table is only rebuilt (or extended by new seeds) from these records.
    A file written before ``collect`` stored its records is refused, not read as an empty table.
    """
    found: dict[str, dict[str, Any]] = {}
    for path in paths:
        payload = json.loads(Path(path).read_text())
        stored = payload.get("runs") if isinstance(payload, dict) else None
        if not isinstance(stored, dict):
            raise SystemExit(f"{path}: no experiment records ('runs'); rerun collect on the experiments")
        found.update({k: v for k, v in stored.items() if k.startswith(prefix + "-")})
    return found


def cmd_collect(args: argparse.Namespace) -> None:
    regime = REGIMES[args.regime]
    prefix = regime_prefix(regime, args.tag)
    # stored records first: an experiment this repository still holds replaces its stored record
    runs = {**runs_from(getattr(args, "runs_from", None) or [], prefix), **_load(prefix)}
    if args.dsink_variant:
        path, name = args.dsink_variant
        found = len(runs)
        runs = with_variant_student(runs, json.loads(Path(path).read_text()), name)
        print(f"D-SINK from variant {name!r} of {path}: {len(runs)} of {found} experiments")
    rows = summarise(runs, regime.settings)
    text = markdown(rows)
    print(text)
    out = Path(args.out or ROOT / f"bench/results/accuracy_{prefix}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    argv = " ".join(args.argv)
    payload = {
        "command": f"python bench/accuracy.py {argv}",
        "experiments": len(runs),
        "rows": rows,
        "runs": runs,  # the records behind the rows, for `collect --runs-from` where the refs are gone
    }
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")
    tmp.replace(out)
    print(f"\n{len(runs)} experiments -> {out}")


def cmd_grid(args: argparse.Namespace) -> None:
    """The whole grid in one command: queue it, drain the queue with ``--jobs`` workers, collect the
    table, and record the wall time from the first queued experiment to the table."""
    start = time.time()
    cmd_queue(args)
    cmd_start(argparse.Namespace(**{**vars(args), "wait": True}))
    cmd_collect(argparse.Namespace(**{**vars(args), "dsink_variant": None}))
    wall = time.time() - start
    prefix = regime_prefix(REGIMES[args.regime], args.tag)
    record = {"command": f"python bench/accuracy.py {' '.join(args.argv)}", "wall_s": round(wall, 1)}
    path = Path(args.wall_out or ROOT / f"bench/results/grid_wall_{prefix}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"grid {prefix}: {wall / 3600:.2f} h from queue to table -> {path}")


def _queue_options(q: argparse.ArgumentParser) -> None:
    q.add_argument("--regime", choices=sorted(REGIMES), default="memorising", help="backbone and schedule")
    q.add_argument(
        "--epochs", type=int, default=None, help="epochs of every training (default: the regime's)"
    )
    q.add_argument("--ratios", type=int, nargs="+", default=[100, 10], help="imbalance ratios")
    q.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds at ratio 100")
    q.add_argument("--seeds-other", type=int, nargs="+", default=[0], help="seeds at other ratios")
    q.add_argument("--noise", nargs="+", default=None, help="only these settings (labels, e.g. sym0.4)")
    q.add_argument("--tag", default=None, help="a variant: names <prefix>_<tag>-r...; with --set")
    q.add_argument("--set", action="append", default=[], help="extra override KEY=VALUE (repeatable)")
    q.add_argument("--root", default=str(ROOT / "data/raw"), help="Fashion-MNIST root (made absolute)")
    q.add_argument("--fp32", action="store_true", help="plain float32 (default: bf16, channels_last auto)")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("queue", help="queue the grid as DVC experiments")
    _queue_options(q)
    q.set_defaults(fn=cmd_queue)
    g = sub.add_parser("grid", help="queue, run and collect the grid in one command (records its wall time)")
    _queue_options(g)
    g.add_argument("--jobs", type=int, default=2, help="parallel queue workers")
    g.add_argument("--out", default=None, help="table JSON (default bench/results/accuracy_<prefix>.json)")
    g.add_argument(
        "--wall-out", default=None, help="wall-time JSON (default bench/results/grid_wall_<prefix>.json)"
    )
    g.set_defaults(fn=cmd_grid)
    s = sub.add_parser("start", help="start queue workers")
    s.add_argument("--jobs", type=int, default=1, help="parallel workers (threads split between them)")
    s.add_argument("--wait", action="store_true", help="return when the queue is empty")
    s.set_defaults(fn=cmd_start)
    c = sub.add_parser("collect", help="table of finished experiments")
    c.add_argument("--regime", choices=sorted(REGIMES), default="memorising")
    c.add_argument("--tag", default=None, help="the variant to collect (see queue --tag)")
    c.add_argument("--out", default=None, help="JSON (default bench/results/accuracy_<prefix>.json)")
    c.add_argument(
        "--dsink-variant",
        nargs=2,
        metavar=("JSON", "NAME"),
        default=None,
        help="D-SINK's student from bench/distill_variants.py's JSON, variant NAME (only its experiments)",
    )
    c.add_argument(
        "--runs-from",
        nargs="+",
        metavar="JSON",
        default=[],
        help="also the experiment records earlier collect calls stored in these JSON files (e.g. seeds "
        "run on another machine or in a clone whose experiment refs are gone)",
    )
    c.set_defaults(fn=cmd_collect)
    args = p.parse_args(argv)
    args.argv = argv
    args.fn(args)


if __name__ == "__main__":
    main()
