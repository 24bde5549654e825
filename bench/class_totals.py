"""How well do the class totals estimate the training set's true class histogram? (diagnostic)

D-SINK's class totals stand for how many training samples each class really holds. This script reads a
finished experiment's teachers (from git and the DVC cache, as `bench/distill_variants.py` does) and, for
each ``distill.class_totals_imbalance_weight`` (``w_r``) asked for, counts the argmax of the mixture
``f_N^(1-w_r) f_L^w_r`` over the training set (``class_totals: hard``,
:func:`dsink.distill.class_total_weights`) and compares it with the clean-label histogram: total
variation distance and the four rarest classes.
The clean labels are read here for evaluation only; nothing chooses a setting from this table (that is
the validation split's job, BENCHMARKS.md).

    python bench/class_totals.py --exps mem_cw-r100-sym0.4-s0 mem_cw-r100-imb0.4-s0 --weights 1 0.3 0
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from distill_variants import diagnostic_parser, experiment_teachers, write_rows  # noqa: E402


def total_variation(counts: np.ndarray, reference: np.ndarray) -> float:
    """``(1/2) sum_c |p_c - r_c|`` between the two histograms normalised to 1."""
    p = np.asarray(counts, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    return float(0.5 * np.abs(p / p.sum() - r / r.sum()).sum())


def main(argv: list[str] | None = None) -> None:
    from dsink.distill import class_total_weights

    p = diagnostic_parser(__doc__, "class_totals.json")
    p.add_argument("--weights", nargs="+", type=float, default=[1.0, 0.3, 0.0], help="w_r values")
    args = p.parse_args(argv)
    rows = []
    print("| experiment | w_r | TV to the clean histogram | four rarest classes (clean) |")
    print("|---|---|---|---|")
    for e, idx, n_train, l_train in experiment_teachers(args.exps, Path(args.workdir)):
        C = idx.num_classes
        clean = np.bincount(idx.clean_label, minlength=C)
        rare = np.argsort(clean, kind="stable")[:4][::-1]
        for w in args.weights:
            counts = np.bincount(class_total_weights(n_train, l_train, w).argmax(1).numpy(), minlength=C)
            tv = total_variation(counts, clean)
            rows.append(
                {"experiment": e, "w_r": w, "tv": tv, "counts": counts.tolist(), "clean": clean.tolist()}
            )
            pairs = ", ".join(f"{counts[c]} ({clean[c]})" for c in rare)
            print(f"| {e} | {w:g} | {tv:.3f} | {pairs} |")
    write_rows(args.out, "class_totals.py", argv, rows)


if __name__ == "__main__":
    main()
