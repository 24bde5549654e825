"""DVC stage `distill`: train the D-SINK student from the two teachers' logits.

Reads `seed`, `data` and `distill`; reads data/corrupted/train.parquet and data/logits/{imbalance,noise}
.parquet (any contract-shaped logits file works: bring your own teacher); writes data/student/model.pt,
data/student/logits.parquet and dvclive curves under dvclive/student.
"""

from __future__ import annotations

import argparse

from dsink import stage


def main(args: argparse.Namespace) -> None:
    from dsink.distill import fit_student
    from dsink.params import load_params

    params = load_params(args.params)
    last = fit_student(
        params, args.corrupted, args.imbalance_logits, args.noise_logits, args.out, args.logits_out, args.live
    )
    if last:
        print(f"distill: test top-1 {last.get('test_top1', float('nan')):.4f} -> {args.out}")


def cli(argv: list[str] | None = None) -> None:
    p = stage.parser(__doc__)
    stage.add_inputs(p, "corrupted", "imbalance-logits", "noise-logits")
    p.add_argument("--out", default="data/student/model.pt", help="student state dict")
    p.add_argument("--logits-out", default="data/student/logits.parquet", help="student logits")
    p.add_argument("--live", default="dvclive/student", help="dvclive directory")
    stage.run(main, p, argv)


if __name__ == "__main__":
    cli()
