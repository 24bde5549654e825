"""How close is the noise teacher's noise-rate estimate to the truth? (README, "The noise-rate estimate")

For each noise setting this makes the corrupted set with the project's `corrupt` stage (params.yaml with
`data.noise.type` / `data.noise.rate` changed, everything written under --out), then runs the noise
teacher exactly as `train_teacher@noise` does (same params, seed, schedule and objective: small-loss
selection keeps every sample until the estimate exists) and, after each of its first --upto epochs,
estimates the noise rate with both mixtures of `dsink.noise_rate`. It stops there: what the teacher does
with the estimate later does not change it. The realised rate is read from the corrupted set's metadata
for this report only.

    python bench/noise_rate.py --out /tmp/noise_rate                      # sym, asym, imb at 0.4
    python bench/noise_rate.py --out /tmp/noise_rate --settings sym0.4 --upto 1

Writes <out>/noise_rate.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SETTINGS = {
    "sym0.4": ("symmetric", 0.4),
    "asym0.4": ("asymmetric", 0.4),
    "imb0.4": ("imbalanced", 0.4),
    "sym0.2": ("symmetric", 0.2),
    "asym0.2": ("asymmetric", 0.2),
}


class _Done(Exception):
    pass


def measure(label: str, out: Path, params_file: Path, upto: int) -> dict:
    import torch

    from dsink.engine import train
    from dsink.inference import predict_logits
    from dsink.models import build_model
    from dsink.noise_rate import MIXTURES, estimate_noise_rate
    from dsink.params import load_params
    from dsink.runs import open_corpus
    from dsink.runtime import Runtime
    from dsink.teachers import noise_recipe
    from stages import corrupt

    kind, rate = SETTINGS[label]
    d = out / label
    d.mkdir(parents=True, exist_ok=True)
    raw = yaml.safe_load(params_file.read_text())
    raw["data"]["noise"].update(type=kind, rate=rate)
    raw["data"]["root"] = str((ROOT / raw["data"]["root"]).resolve())
    raw["teachers"]["noise"].update(method="small_loss", forget_rate=None)
    (d / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    corrupted = d / "train.parquet"
    corrupt.cli(
        [
            "--params",
            str(d / "params.yaml"),
            "--out",
            str(corrupted),
            "--metrics",
            str(d / "corrupt.json"),
            "--val-out",
            str(d / "val.parquet"),
        ]  # fmt: skip
    )

    params = load_params(d / "params.yaml")
    corpus = open_corpus(params, corrupted)
    tp = params.teachers.noise
    recipe = noise_recipe(tp, corpus.index)
    rt = Runtime(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(params.seed)
    model = build_model(tp.model, corpus.index.num_classes, corpus.source.channels)
    idx = corpus.index
    rows = []

    def on_epoch_start(m: torch.nn.Module, epoch: int) -> None:
        if epoch == 0:
            return
        z = predict_logits(m, corpus.source.train, idx.sample_id, corpus.normalizer, rt.device, 512, rt=rt)
        row = {
            "after_epochs": epoch,
            **{mix: estimate_noise_rate(z, idx.noisy_label, mix) for mix in MIXTURES},
        }
        rows.append(row)
        print(f"{label}: after {epoch} epoch(s) {row}", flush=True)
        if epoch >= upto:
            raise _Done

    try:
        train(model, recipe.objective, corpus.training_set(), corpus.normalizer, tp, params.seed, rt,
              on_epoch_start=on_epoch_start, desc=f"noise teacher {label}")  # fmt: skip
    except _Done:
        pass
    return {
        "noise": {"type": kind, "rate": rate},
        "realised": float(idx.meta["noise_rate"]),  # report only
        "num_samples": int(idx.sample_id.size),
        "estimates": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--out", required=True, type=Path, help="working directory for corrupted sets and results"
    )
    ap.add_argument("--params", default=str(ROOT / "params.yaml"), type=Path, help="base params file")
    ap.add_argument(
        "--settings", default="sym0.4,asym0.4,imb0.4", help=f"comma list of {', '.join(SETTINGS)}"
    )
    ap.add_argument("--upto", type=int, default=3, help="estimate after each of the first N epochs")
    args = ap.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    results = {}
    for label in args.settings.split(","):
        results[label] = measure(label, args.out.resolve(), args.params.resolve(), args.upto)
        (args.out / "noise_rate.json").write_text(json.dumps(results, indent=2) + "\n")
    print("\nsetting   realised  after  per_class  global")
    for label, r in results.items():
        for row in r["estimates"]:
            print(
                f"{label:9s} {r['realised']:.4f}    {row['after_epochs']:>3d}    "
                f"{row['per_class']:.4f}     {row['global']:.4f}"
            )


if __name__ == "__main__":
    main()
