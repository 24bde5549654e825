"""Distill variants on finished experiments: retrain only the D-SINK student, reuse everything else.

Choosing D-SINK's own settings (`distill.*`) on the validation split should not retrain four models per
try. For each finished experiment named on the command line (a cell of `bench/accuracy.py`), this script
takes the inputs of its `distill` stage from git and the DVC cache (the corrupted set, the validation
split, both teachers' logits and the baselines' logits, by the md5s its `dvc.lock` records), writes the
experiment's params.yaml with the variant's overrides, and runs the project's own stage scripts
(`stages/distill.py`, then `stages/evaluate.py`) on them in `.dsink/bench/variants/<experiment>/<variant>/`.
So a variant's student is exactly what `dvc exp run -S ...` would have trained on those teachers with
today's code, without touching the workspace or the queue.

    python bench/distill_variants.py --exps mem_nf1none-r100-sym0.4-s0 mem_nf1none-r100-imb0.4-s0 \\
        --variant paper distill.sinkhorn.reg=2.0 \\
        --variant w0.3 distill.cost_imbalance_weight=0.3 distill.sinkhorn.reg=0.5

It prints, per variant, D-SINK's validation top-1 in every experiment and their mean (what to choose
on) and the test top-1 beside it (for reading only), next to the best other method of the experiment
(its validation and test top-1 as the experiment measured them), and writes the rows as JSON, with each
student's whole metrics block: `bench/accuracy.py collect --dsink-variant <json> <name>` builds the
grid's table with a variant's student in place of the one each experiment trained. A variant
already computed (same experiment, same effective params, same stage code) is read back, not retrained.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from accuracy import SINGLE, find_experiments, git_show, require_finished  # noqa: E402

#: distill's inputs: path in the experiment -> file name here
INPUTS = {
    "data/corrupted/train.parquet": "train.parquet",
    "data/corrupted/val.parquet": "val.parquet",
    "data/logits/noise.parquet": "noise.parquet",
    "data/logits/imbalance.parquet": "imbalance.parquet",
    "data/baselines/ce/logits.parquet": "baselines/ce/logits.parquet",
    "data/baselines/la_small_loss/logits.parquet": "baselines/la_small_loss/logits.parquet",
}


def _git_show(rev: str, path: str) -> str:
    text = git_show(rev, path)
    if text is None:
        raise SystemExit(f"commit {rev[:10]} has no {path}")
    return text


def extract(name: str, rev: str, root: Path) -> Path:
    """The experiment's distill inputs, params and metrics under ``root/name`` (copied once)."""
    d = root / name
    if (d / "done").exists():
        return d
    lock = yaml.safe_load(_git_show(rev, "dvc.lock"))
    cache = ROOT / ".dvc/cache/files/md5"
    found = {}
    for stage in lock["stages"].values():
        for out in stage.get("outs", []):
            if out["path"] in INPUTS:
                found[out["path"]] = out["md5"]
    missing = sorted(set(INPUTS) - set(found))
    if missing:
        raise SystemExit(f"{name}: dvc.lock has no {', '.join(missing)}")
    for path, md5 in found.items():
        src = cache / md5[:2] / md5[2:]
        if not src.exists():
            raise SystemExit(f"{name}: {path} (md5 {md5}) is not in the DVC cache; `dvc exp pull` it first")
        dst = d / INPUTS[path]
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    (d / "params.yaml").write_text(_git_show(rev, "params.yaml"))
    (d / "evaluate.json").write_text(_git_show(rev, "metrics/evaluate.json"))
    (d / "done").write_text(rev + "\n")
    return d


def experiment_teachers(names: list[str], workdir: Path) -> Iterator[tuple[str, Any, Any, Any]]:
    """For each finished experiment named: ``(name, index, noise_train, imbalance_train)``, its corrupted
    index and both teachers' training logits in their training-prior space
    (:func:`dsink.distill.teachers_train_space`), as its student read them. For the diagnostics."""
    from dsink.artifacts import read_corrupted, read_logits
    from dsink.distill import teachers_train_space
    from dsink.params import DistillParams

    finished = find_experiments(ROOT)
    require_finished(names, finished)
    for e in names:
        cell = extract(e, finished[e], workdir)
        idx = read_corrupted(cell / "train.parquet")
        t_n, t_l = (read_logits(cell / f, idx) for f in ("noise.parquet", "imbalance.parquet"))
        n_train, l_train = teachers_train_space(t_n, t_l, DistillParams(), idx)
        yield e, idx, n_train, l_train


def diagnostic_parser(doc: str | None, out_name: str) -> argparse.ArgumentParser:
    """The command line every teacher diagnostic shares: finished experiments, a work dir, a JSON out."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exps", nargs="+", required=True, help="finished experiment names")
    p.add_argument("--workdir", default=str(ROOT / ".dsink/bench/variants"), help="where inputs are kept")
    p.add_argument("--out", default=str(ROOT / f"bench/results/{out_name}"), help="JSON rows")
    return p


def _no_nan(x: Any) -> Any:
    """``x`` with every float NaN (an empty class or split) as ``None``: strict JSON."""
    if isinstance(x, float) and x != x:
        return None
    if isinstance(x, dict):
        return {k: _no_nan(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_no_nan(v) for v in x]
    return x


def write_rows(out: str | Path, script: str, argv: list[str] | None, rows: list[dict[str, Any]]) -> Path:
    """``{"command", "rows"}`` to ``out`` (strict JSON, written whole or not at all); the command is the
    script with the arguments it was given."""
    from dsink.artifacts import atomic_path

    out = Path(out)
    cmd = f"python bench/{script} " + " ".join(sys.argv[1:] if argv is None else argv)
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps({"command": cmd, "rows": _no_nan(rows)}, indent=1) + "\n")
    print(f"-> {out}")
    return out


def with_overrides(params: dict[str, Any], sets: list[str]) -> dict[str, Any]:
    out = json.loads(json.dumps(params))
    for item in sets:
        key, _, value = item.partition("=")
        if not _ or not key:
            raise SystemExit(f"override {item!r}: expected KEY=VALUE")
        node = out
        *parents, leaf = key.split(".")
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = yaml.safe_load(value)
    return out


def _code_hash() -> str:
    h = hashlib.sha256()
    for p in sorted([*ROOT.glob("dsink/**/*.py"), ROOT / "stages/distill.py", ROOT / "stages/evaluate.py"]):
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def variant_dir(cell: Path, variant: str, sets: list[str], code: str) -> Path:
    """Where the variant's student of ``cell`` is kept: keyed by its effective params and the stage code."""
    params = with_overrides(yaml.safe_load((cell / "params.yaml").read_text()), sets)
    key = hashlib.sha256(json.dumps([params, code], sort_keys=True).encode()).hexdigest()[:16]
    return cell / f"{variant}-{key}"


def run_variant(cell: Path, variant: str, sets: list[str], code: str) -> dict[str, Any]:
    params = with_overrides(yaml.safe_load((cell / "params.yaml").read_text()), sets)
    d = variant_dir(cell, variant, sets, code)
    result = d / "evaluate.json"
    if not result.exists():
        d.mkdir(parents=True, exist_ok=True)
        (d / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        py = sys.executable
        common = [
            "--params", str(d / "params.yaml"),
            "--corrupted", str(cell / "train.parquet"),
            "--noise-logits", str(cell / "noise.parquet"),
            "--imbalance-logits", str(cell / "imbalance.parquet"),
        ]  # fmt: skip
        subprocess.run(
            [py, "stages/distill.py", *common, "--out", str(d / "model.pt"),
             "--logits-out", str(d / "logits.parquet"), "--live", str(d / "live")],
            cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        tmp = d / "evaluate.tmp.json"
        subprocess.run(
            [py, "stages/evaluate.py", *common, "--val", str(cell / "val.parquet"),
             "--student-logits", str(d / "logits.parquet"), "--baselines", str(cell / "baselines"),
             "--live", str(d / "live"), "--metrics", str(tmp), "--plots", str(d / "plots")],
            cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        os.replace(tmp, result)
    return json.loads(result.read_text())["dsink"]


def _top1(m: dict[str, Any] | None, split: str) -> float | None:
    if not m:
        return None
    if split == "val":
        return (m.get("val") or {}).get("top1")
    return m.get("top1")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exps", nargs="+", required=True, help="finished experiment names")
    p.add_argument(
        "--variant",
        nargs="+",
        action="append",
        required=True,
        metavar=("NAME", "KEY=VALUE"),
        help="a variant: its name, then params overrides (repeatable; no overrides: the experiment's own)",
    )
    p.add_argument("--workdir", default=str(ROOT / ".dsink/bench/variants"), help="where runs are kept")
    p.add_argument("--out", default=str(ROOT / "bench/results/distill_variants.json"), help="JSON rows")
    args = p.parse_args(argv)
    finished = find_experiments(ROOT)
    require_finished(args.exps, finished)
    root = Path(args.workdir)
    cells = {e: extract(e, finished[e], root) for e in args.exps}
    code = _code_hash()
    others = {}
    for e, cell in cells.items():
        m = json.loads((cell / "evaluate.json").read_text())
        best = max(SINGLE, key=lambda k: _top1(m.get(k), "val") or -1.0)
        others[e] = {"method": best, "val": _top1(m[best], "val"), "test": _top1(m[best], "test")}
    rows = []
    for name, *sets in args.variant:
        row: dict[str, Any] = {"variant": name, "overrides": sets, "cells": {}}
        for e, cell in cells.items():
            m = run_variant(cell, name, sets, code)
            row["cells"][e] = {
                "val": _top1(m, "val"),
                "test": _top1(m, "test"),
                "few": m.get("few"),
                "dir": str(variant_dir(cell, name, sets, code)),
                "dsink": m,
            }
            print(
                f"{name:>12} {e}: val {row['cells'][e]['val']:.4f} test {row['cells'][e]['test']:.4f}",
                flush=True,
            )
        vals = [c["val"] for c in row["cells"].values()]
        row["mean_val"] = statistics.fmean(vals)
        row["mean_test"] = statistics.fmean(c["test"] for c in row["cells"].values())
        rows.append(row)
    head = "| variant | " + " | ".join(args.exps) + " | mean val |"
    lines = [head, "|" + "---|" * (len(args.exps) + 2)]
    lines.append(
        "| best other (val-chosen) | "
        + " | ".join(
            f"{others[e]['val'] * 100:.2f} ({others[e]['test'] * 100:.2f}) {others[e]['method']}"
            for e in args.exps
        )
        + f" | {statistics.fmean(o['val'] for o in others.values()) * 100:.2f} |"
    )
    for r in rows:
        cells_txt = " | ".join(
            f"{r['cells'][e]['val'] * 100:.2f} ({r['cells'][e]['test'] * 100:.2f})" for e in args.exps
        )
        lines.append(f"| {r['variant']} | {cells_txt} | {r['mean_val'] * 100:.2f} |")
    print("\nvalidation top-1 (test top-1, for reading only)\n" + "\n".join(lines))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = "python bench/distill_variants.py " + " ".join(sys.argv[1:] if argv is None else argv)
    payload = {"command": cmd, "best_other": others, "rows": rows, "code": code}
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    tmp.replace(out)
    print(f"-> {out}")


if __name__ == "__main__":
    main()
