"""DVC stage `train_teacher@<role>`: train the imbalance-robust (f_L) or noise-robust (f_N) teacher.

Reads `seed`, `data` and `teachers.<role>`; writes data/teachers/<role>/model.pt (a state dict),
data/teachers/<role>/estimate.json (the noise teacher's noise-rate estimate, null when not estimated)
and dvclive curves under dvclive/teacher_<role>. No clean label reaches the weights. Resumes from
.dsink/checkpoints when a run of the same params was interrupted. Runs single-process, or DDP when
launched by torchrun.

With `teachers.<role>.folds: k >= 2` it trains k fold models one after another (k-fold cross-fitting,
stratified by noisy label: model j never sees fold j), so dump_logits can give every training sample
logits from a model that did not train on it; model.pt then holds the k state dicts and the fold
assignment, estimate.json the mean estimate and one per fold, and the dvclive curves are the folds'
mean (each fold's under fold_<j>/).
"""

from __future__ import annotations

import argparse

from dsink import stage


def main(args: argparse.Namespace) -> None:
    from dsink.params import load_params
    from dsink.teacher_training import fit_teacher

    params = load_params(args.params)
    model_out = args.out or f"data/teachers/{args.role}/model.pt"
    live = args.live or f"dvclive/teacher_{args.role}"
    estimate = args.estimate or f"data/teachers/{args.role}/estimate.json"
    last = fit_teacher(params, args.role, args.corrupted, model_out, live, estimate)
    if last:
        print(f"teacher[{args.role}]: test top-1 {last.get('test_top1', float('nan')):.4f} -> {model_out}")
    if "noise_rate_estimate" in last:
        est = last["noise_rate_estimate"]
        print(f"teacher[{args.role}]: noise rate estimated from the noisy labels {est:.4f}")


def cli(argv: list[str] | None = None) -> None:
    p = stage.parser(__doc__)
    p.add_argument("--role", required=True, choices=("imbalance", "noise"), help="which teacher to train")
    stage.add_inputs(p, "corrupted")
    p.add_argument("--out", default=None, help="model path (default: data/teachers/<role>/model.pt)")
    p.add_argument("--live", default=None, help="dvclive directory (default: dvclive/teacher_<role>)")
    p.add_argument(
        "--estimate",
        default=None,
        help="noise-rate estimate JSON (default: data/teachers/<role>/estimate.json)",
    )
    stage.run(main, p, argv)


if __name__ == "__main__":
    cli()
