"""DVC stage `evaluate`: the student, both teachers and the comparisons on the clean, balanced test set.

The comparisons are the average of the two teachers' probabilities and the baselines of
`train_baseline@{ce,la_gce}`. Reads `data` (to find the test labels) and `evaluate`; reads the logits
files; writes
metrics/evaluate.json, plots/per_class.json, plots/confusion.json and PNG figures under plots/.
Trains nothing: changing `evaluate` params reruns only this stage.
"""

from __future__ import annotations

import argparse

from dsink import stage


def main(args: argparse.Namespace) -> None:
    from pathlib import Path

    from dsink import figures
    from dsink.artifacts import read_corrupted, read_logits, write_json
    from dsink.data.sources import load_source
    from dsink.evaluation import average_probabilities, evaluate_models
    from dsink.params import load_params

    params = load_params(args.params)
    index = read_corrupted(args.corrupted)
    test_labels = load_source(params.data).test.labels
    paths = {
        "dsink": args.student_logits,
        "imbalance_teacher": args.imbalance_logits,
        "noise_teacher": args.noise_logits,
    }
    logits: dict = {name: read_logits(path, index, test_labels.size) for name, path in paths.items()}
    logits["teacher_average"] = average_probabilities(logits["imbalance_teacher"], logits["noise_teacher"])
    for method in ("ce", "la_gce"):
        logits[method] = read_logits(f"{args.baselines}/{method}/logits.parquet", index, test_labels.size)
    ep = params.evaluate
    metrics, tables = evaluate_models(logits, test_labels, index, ep.many_threshold, ep.few_threshold)
    plots = Path(args.plots)
    write_json(plots / "per_class.json", tables["per_class"])
    conf = tables["confusion"]
    names = tables["class_names"]
    pairs = [
        {"actual": names[i], "predicted": names[j]}
        for i in range(conf.shape[0])
        for j in range(conf.shape[1])
        for _ in range(int(conf[i, j]))
    ]
    write_json(plots / "confusion.json", pairs)
    figures.per_class_figure(tables["per_class"], plots / "per_class.png")
    figures.confusion_figure(conf, names, plots / "confusion.png")
    live = {
        "dsink": Path(args.live) / "student",
        "imbalance_teacher": Path(args.live) / "teacher_imbalance",
        "noise_teacher": Path(args.live) / "teacher_noise",
        "ce": Path(args.live) / "baseline_ce",
        "la_gce": Path(args.live) / "baseline_la_gce",
    }
    figures.curves_figure(live, plots / "curves.png")
    figures.corrected_figure(live, plots / "corrected.png")
    write_json(args.metrics, metrics)
    for name in logits:
        m = metrics[name]
        print(f"evaluate: {name:18s} top1 {m['top1']:.4f}  few {m['few']}  corrected {m['corrected']}")


def cli(argv: list[str] | None = None) -> None:
    p = stage.parser(__doc__)
    p.add_argument("--corrupted", default="data/corrupted/train.parquet", help="corrupted index")
    p.add_argument("--student-logits", default="data/student/logits.parquet", help="student logits")
    p.add_argument("--imbalance-logits", default="data/logits/imbalance.parquet", help="f_L logits")
    p.add_argument("--noise-logits", default="data/logits/noise.parquet", help="f_N logits")
    p.add_argument(
        "--baselines", default="data/baselines", help="train_baseline outputs (<m>/logits.parquet)"
    )
    p.add_argument("--live", default="dvclive", help="dvclive root holding the trainings' curves")
    p.add_argument("--metrics", default="metrics/evaluate.json", help="metrics file")
    p.add_argument("--plots", default="plots", help="plots directory")
    stage.run(main, p, argv)


if __name__ == "__main__":
    cli()
