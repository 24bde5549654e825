"""Training-step time in fp32, bf16 autocast, channels_last and both, on this machine.

    .venv/bin/python bench/precision.py                    # both models, table + bench/results/precision.json
    .venv/bin/python bench/precision.py --models small_cnn --steps 5 --repeats 2
    .venv/bin/python bench/precision.py --device cuda      # on a GPU

What one step is: the engine's training step on a synthetic batch (random images of the real shape,
random labels), i.e. forward (under ``torch.autocast(bfloat16)`` for bf16), cross-entropy in float32,
backward, and an SGD step with Nesterov momentum and weight decay (``dsink/engine.py``'s optimiser).
Models and shapes: ``small_cnn`` on 1 x 28 x 28 (Fashion-MNIST, the default pipeline's input) and
``resnet32`` on 3 x 32 x 32 (CIFAR-10, ``configs/cifar10_lt_paper.yaml``), 10 classes, batch 128.

The four settings are measured in interleaved rounds (each round times every setting once, ``--steps``
steps after ``--warmup`` untimed ones), so a change of load on a shared machine hits all of them alike.
The figure is the *best* round's mean step time: on a machine shared with other jobs load only ever adds
time, so the fastest round is the closest to the setting's own cost. The median and slowest round, and
the load average before and after, are in the JSON. Seconds per epoch = step time x steps per epoch of
the real training sets (Fashion-MNIST-LT ratio 100: 14,886 images = 117 steps; CIFAR-10-LT ratio 100:
12,406 images = 97 steps).

It also runs what ``bf16: auto`` / ``channels_last: auto`` run before a training (``dsink.precision``'s
``step_timer`` + ``pick_precision`` on one batch) and records the decision and the seconds it took.

The CPU model and the flags that decide whether bf16 pays off on a CPU (``avx512_bf16``, ``amx_bf16``,
``amx_tile``; ``avx512f``, ``avx2`` for context) are read from ``lscpu``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsink.models import build_model  # noqa: E402
from dsink.precision import Precision, pick_precision, precision_candidates, step_timer  # noqa: E402

SHAPES = {"small_cnn": (1, 28, 28), "resnet32": (3, 32, 32)}
EPOCH_IMAGES = {"small_cnn": 14_886, "resnet32": 12_406}  # the LT training sets each model is used on
SETTINGS = [Precision(False, False), Precision(True, False), Precision(False, True), Precision(True, True)]
CPU_FLAGS = ("avx512_bf16", "amx_bf16", "amx_tile", "avx512f", "avx2")


def cpu_info() -> dict:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        text = ""
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    flags = set(fields.get("Flags", "").split())
    return {
        "model_name": fields.get("Model name", platform.processor() or "unknown"),
        "cpus": os.cpu_count(),
        "flags": {f: f in flags for f in CPU_FLAGS},
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def one_model(name: str, batch: int, device: torch.device):
    torch.manual_seed(0)
    model = build_model(name, 10, SHAPES[name][0]).to(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *SHAPES[name], generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    return model, x, y


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, prec: Precision):
    """A closure running one engine-like training step under ``prec`` on its own copy of the model."""
    import copy

    m = copy.deepcopy(model).train()
    if prec.channels_last:
        m = m.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)

    def step() -> None:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=prec.bf16):
            z = m(x)
        loss = nn.functional.cross_entropy(z.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()

    return step


def bench_model(name: str, batch: int, steps: int, warmup: int, repeats: int, device: torch.device) -> dict:
    load_before = os.getloadavg()
    began = time.time()
    model, x, y = one_model(name, batch, device)
    run = {prec: make_step(model, x, y, prec) for prec in SETTINGS}
    for step in run.values():  # warm up every setting (allocator, oneDNN kernels) before any round
        for _ in range(warmup):
            step()
    rounds: dict[Precision, list[float]] = {prec: [] for prec in SETTINGS}
    for r in range(repeats):
        for prec, step in run.items():
            start = time.perf_counter()
            for _ in range(steps):
                step()
            rounds[prec].append((time.perf_counter() - start) / steps)
        print(f"  {name}: round {r + 1}/{repeats} done", file=sys.stderr, flush=True)
    steps_per_epoch = math.ceil(EPOCH_IMAGES[name] / batch)
    fp32 = min(rounds[SETTINGS[0]])
    rows = []
    for prec in SETTINGS:
        t = min(rounds[prec])
        rows.append(
            {
                "setting": prec.label,
                "bf16": prec.bf16,
                "channels_last": prec.channels_last,
                "step_s": t,
                "step_s_median": statistics.median(rounds[prec]),
                "step_s_max": max(rounds[prec]),
                "rounds_s": rounds[prec],
                "epoch_s": t * steps_per_epoch,
                "speedup_vs_fp32": fp32 / t,
            }
        )
    # what `bf16: auto` + `channels_last: auto` decide for this model and batch, and what deciding costs
    start = time.perf_counter()
    chosen, times = pick_precision(precision_candidates("auto", "auto"), step_timer(model, x, y))
    auto = {
        "chosen": chosen.label,
        "decision_s": time.perf_counter() - start,
        "timed_step_s": {c.label: t for c, t in times.items()},
    }
    return {
        "model": name,
        "input": list(SHAPES[name]),
        "batch_size": batch,
        "steps_per_epoch": steps_per_epoch,
        "epoch_images": EPOCH_IMAGES[name],
        "settings": rows,
        "auto": auto,
        "steps": steps,
        "warmup": warmup,
        "repeats": repeats,
        "wall_s": time.time() - began,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", choices=sorted(SHAPES), default=["small_cnn", "resnet32"])
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per setting and round (default 5)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per setting first (default 2)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--out", default="bench/results/precision.json")
    ap.add_argument(
        "--merge",
        action="store_true",
        help="keep the other models' results already in --out (rerun one model on a quieter machine)",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    machine = {
        "cpu": cpu_info(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "platform": platform.platform(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "loadavg_before": os.getloadavg(),
    }
    print(
        f"{machine['cpu']['model_name']} ({machine['cpu']['cpus']} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, device {machine['device']}); "
        + ", ".join(f"{f}: {'yes' if on else 'no'}" for f, on in machine["cpu"]["flags"].items())
    )
    results = []
    for name in args.models:
        res = bench_model(name, args.batch_size, args.steps, args.warmup, args.repeats, device)
        res["command"] = "bench/precision.py " + " ".join(sys.argv[1:])
        results.append(res)
    machine["loadavg_after"] = os.getloadavg()
    if args.merge and Path(args.out).exists():
        done = {r["model"] for r in results}
        kept = [r for r in json.loads(Path(args.out).read_text())["results"] if r["model"] not in done]
        results = sorted(kept + results, key=lambda r: list(SHAPES).index(r["model"]))
    print()
    print(f"{'model':10} {'setting':20} {'ms/step':>9} {'(median, max)':>15} {'s/epoch':>8} {'vs fp32':>8}")
    for res in results:
        for row in res["settings"]:
            spread = f"{row['step_s_median'] * 1e3:.0f}, {row['step_s_max'] * 1e3:.0f}"
            print(
                f"{res['model']:10} {row['setting']:20} {row['step_s'] * 1e3:9.1f} {spread:>15} "
                f"{row['epoch_s']:8.1f} {row['speedup_vs_fp32']:7.2f}x"
            )
        a = res["auto"]
        print(f"{res['model']:10} auto -> {a['chosen']} (deciding took {a['decision_s']:.1f} s)")
    out = {
        "command": "bench/precision.py " + " ".join(sys.argv[1:]) + (" (merged)" if args.merge else ""),
        "date": datetime.date.today().isoformat(),
        "machine": machine,
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
