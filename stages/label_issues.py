"""DVC stage `label_issues`: which training labels are wrong, from D-SINK's transport plan.

Solves the surrogate labels q once more over the whole training set from the final student (the
dataset-scope solve of `distill`) and flags sample i when q_i prefers another class than its given label
(issue_score = 1 - q_i[given label], suggested label = argmax q_i; no threshold, no noise rate).
Reads `data` and `distill` (solver settings) and `evaluate` (shot groups); reads the corrupted set, the
two teachers' and the student's logits. Writes data/label_issues.parquet (one row per training sample),
data/label_issues.csv (the flagged samples, highest score first, with class names and the image file or
source index) and metrics/label_issues.json (num_flagged; with injected noise also precision, recall, F1
and AUROC against it, overall and per many/medium/few group).
"""

from __future__ import annotations

import argparse

from dsink import stage


def main(args: argparse.Namespace) -> None:
    import csv
    from pathlib import Path

    from dsink.artifacts import atomic_path, read_corrupted, read_logits, read_validation, write_json
    from dsink.data.sources import load_source
    from dsink.distill import teachers_train_space
    from dsink.evaluation import class_groups
    from dsink.label_issue_metrics import grouped_detection_scores, has_ground_truth
    from dsink.label_issues import (
        CSV_COLUMNS,
        RULE,
        find_issues,
        flagged_rows,
        surrogate_labels,
        write_issues,
    )
    from dsink.params import load_params

    params = load_params(args.params)
    index = read_corrupted(args.corrupted)
    source = load_source(params.data)
    val_ids = read_validation(args.val, index).sample_id if Path(args.val).is_file() else None
    n_test = len(source.test)
    t_l, t_n, student = (
        read_logits(p, index, n_test, val_ids=val_ids)
        for p in (args.imbalance_logits, args.noise_logits, args.student_logits)
    )
    dp = params.distill
    n_train, l_train = teachers_train_space(t_n, t_l, dp, index)
    q = surrogate_labels(dp, n_train, l_train, student, index.noisy_label)
    issues = find_issues(q, index.noisy_label, index.sample_id)
    names = [str(n) for n in index.meta.get("class_names") or range(index.num_classes)]
    write_issues(
        args.out,
        issues,
        {"dataset": index.dataset, "num_classes": index.num_classes, "class_names": names, "rule": RULE},
    )
    rows = flagged_rows(issues, names, source.train.paths)
    with atomic_path(args.csv) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    metrics = {"num_samples": int(issues.sample_id.size), "num_flagged": len(rows)}
    metrics["flagged_share"] = len(rows) / max(1, issues.sample_id.size)
    if has_ground_truth(index.meta):
        ep = params.evaluate
        groups = class_groups(index.clean_counts(), ep.many_threshold, ep.few_threshold)
        scores = grouped_detection_scores(
            issues.is_issue, issues.issue_score, index.is_noisy, index.noisy_label, groups
        )
        metrics.update(scores.pop("overall"))
        metrics.update(scores)
    write_json(args.metrics, metrics)
    msg = f"label_issues: {len(rows)} of {issues.sample_id.size} labels flagged -> {args.csv}"
    if "f1" in metrics and metrics["f1"] is not None:
        msg += (
            f" (precision {metrics['precision']:.3f}, recall {metrics['recall']:.3f} vs the injected noise)"
        )
    print(msg)


def cli(argv: list[str] | None = None) -> None:
    p = stage.parser(__doc__)
    stage.add_inputs(
        p,
        "corrupted",
        "val",
        "imbalance-logits",
        "noise-logits",
        "student-logits",
        helps={"val": "validation split (if any)"},
    )
    p.add_argument("--out", default="data/label_issues.parquet", help="one row per training sample")
    p.add_argument("--csv", default="data/label_issues.csv", help="the flagged samples, highest score first")
    p.add_argument("--metrics", default="metrics/label_issues.json", help="metrics file")
    stage.run(main, p, argv)


if __name__ == "__main__":
    cli()
