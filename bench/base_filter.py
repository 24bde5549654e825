"""Which labels does the base loss teach? The noise-teacher base filters against the truth (diagnostic)

``distill.base_filter: noise_teacher`` applies the student's base loss only to the samples the noise
teacher keeps within each given-label class; ``noise_teacher_chance`` forgets only labels the teacher
also gives less than chance probability. This script reads a finished experiment's noise teacher (from
git and the DVC cache, as `bench/distill_variants.py` does), computes each filter's mask exactly as the
student does (:func:`dsink.distill.noise_teacher_selection`), and compares it with the clean labels:
the share of wrong labels the filter keeps (what the base loss would teach wrongly), the share of clean
labels it keeps (what it would teach rightly), and per given-label class the share the filter forgets
beside the true share of wrong labels (the table names the class it forgets most of:
``class: forgotten share (true wrong share)``; the JSON holds every class).
The clean labels are read here for evaluation only; nothing chooses a setting from this table (that is
the validation split's job, BENCHMARKS.md).

    python bench/base_filter.py --exps mem_full-r100-asym0.4-s2 acc_nt-r100-sym0.2-s0
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from distill_variants import diagnostic_parser, experiment_teachers, write_rows  # noqa: E402


def filter_report(keep: np.ndarray, noisy: np.ndarray, clean: np.ndarray, num_classes: int) -> dict[str, Any]:
    """How a keep mask over the training samples treats the wrong and the clean labels.

    ``kept_wrong`` / ``kept_clean``: the share of wrongly / correctly labelled samples kept.
    ``forgot[c]`` and ``wrong[c]``: within given-label class ``c``, the share the mask drops and the true
    share of wrong labels (``nan`` for a class nobody is labelled with); ``clean_kept[c]`` and
    ``wrong_kept[c]``: the share of the class's correctly and wrongly labelled samples it keeps.
    """
    keep = np.asarray(keep, dtype=bool)
    noisy, clean = np.asarray(noisy), np.asarray(clean)
    wrong = noisy != clean

    def share(num: np.ndarray, den: np.ndarray) -> list[float]:
        with np.errstate(invalid="ignore", divide="ignore"):
            return (num / den).tolist()

    def per_class(mask: np.ndarray) -> np.ndarray:
        return np.bincount(noisy[mask], minlength=num_classes).astype(np.float64)

    n_c = per_class(np.ones_like(keep))
    return {
        "kept_wrong": float(keep[wrong].mean()) if wrong.any() else float("nan"),
        "kept_clean": float(keep[~wrong].mean()) if (~wrong).any() else float("nan"),
        "forgot": share(n_c - per_class(keep), n_c),
        "wrong": share(per_class(wrong), n_c),
        "clean_kept": share(per_class(keep & ~wrong), per_class(~wrong)),
        "wrong_kept": share(per_class(keep & wrong), per_class(wrong)),
    }


def main(argv: list[str] | None = None) -> None:
    from dsink.distill import NOISE_TEACHER_FILTERS, noise_teacher_selection

    args = diagnostic_parser(__doc__, "base_filter.json").parse_args(argv)
    rows = []
    print("| experiment | filter | wrong labels kept | clean labels kept | most-forgotten class |")
    print("|---|---|---|---|---|")
    for e, idx, n_train, _ in experiment_teachers(args.exps, Path(args.workdir)):
        for name, chance in NOISE_TEACHER_FILTERS.items():
            keep = noise_teacher_selection(n_train, idx.noisy_label, above_chance=chance)
            r = filter_report(keep, idx.noisy_label, idx.clean_label, idx.num_classes)
            rows.append({"experiment": e, "filter": name, **r})
            c = int(np.nanargmax(r["forgot"]))
            print(
                f"| {e} | {name} | {100 * r['kept_wrong']:.1f} % | {100 * r['kept_clean']:.1f} % "
                f"| {c}: {100 * r['forgot'][c]:.1f} % ({100 * r['wrong'][c]:.1f} %) |"
            )
    write_rows(args.out, "base_filter.py", argv, rows)


if __name__ == "__main__":
    main()
