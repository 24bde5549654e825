"""DVC stage `train_baseline@<method>`: a comparison model on the same corrupted set as D-SINK.

`ce` is plain cross-entropy on the noisy labels; `la_small_loss` is one model for both problems,
logit-adjusted CE on the samples class-aware small-loss selection keeps (its noise rate estimated from
the noisy labels, as the noise teacher does). Reads `seed`, `data`, `baselines.<method>` and `dump`; writes
data/baselines/<method>/model.pt and data/baselines/<method>/logits.parquet (the teacher logits schema,
so `evaluate` reports the baseline beside D-SINK) and dvclive curves under dvclive/baseline_<method>.
Resumes from .dsink/checkpoints; runs single-process or DDP under torchrun, like the teachers.
"""

from __future__ import annotations

import argparse

from dsink import stage


def main(args: argparse.Namespace) -> None:
    from dsink.baselines import fit_baseline
    from dsink.params import load_params

    params = load_params(args.params)
    base = f"data/baselines/{args.method}"
    model_out = args.out or f"{base}/model.pt"
    logits_out = args.logits_out or f"{base}/logits.parquet"
    live = args.live or f"dvclive/baseline_{args.method}"
    last = fit_baseline(params, args.method, args.corrupted, model_out, logits_out, live)
    tracked = f", test top-1 {last['test_top1']:.4f}" if "test_top1" in last else ""
    print(f"baseline[{args.method}]: trained{tracked} -> {logits_out}")


def cli(argv: list[str] | None = None) -> None:
    p = stage.parser(__doc__)
    p.add_argument("--method", required=True, choices=("ce", "la_small_loss"), help="which baseline to train")
    stage.add_inputs(p, "corrupted")
    p.add_argument("--out", default=None, help="model path (default: data/baselines/<method>/model.pt)")
    p.add_argument(
        "--logits-out", default=None, help="logits Parquet (default: data/baselines/<method>/logits.parquet)"
    )
    p.add_argument("--live", default=None, help="dvclive directory (default: dvclive/baseline_<method>)")
    stage.run(main, p, argv)


if __name__ == "__main__":
    cli()
