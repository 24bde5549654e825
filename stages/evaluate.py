"""DVC stage `evaluate`: the student, both teachers and the comparisons on the clean, balanced test set.

The comparisons are the average of the two teachers' probabilities and the baselines of
`train_baseline@{ce,la_small_loss}`. Every model is read in the balanced space (`raw + train_offset -
train_log_prior`, see dsink/evaluation.py) for the accuracies, the label-repair shares and the average.
Reads `data` (to find the test labels) and `evaluate`; reads the logits files, the validation split and
the trainings' dvclive curves; writes metrics/evaluate.json (test metrics, `val` metrics per model, the
noise teacher's noise-rate estimate beside the realised rate), plots/per_class.json, plots/confusion.json
and PNG figures under plots/. Trains nothing: changing `evaluate` params reruns only this stage.
"""

from __future__ import annotations

import argparse

from dsink import stage


def main(args: argparse.Namespace) -> None:
    from pathlib import Path

    from dsink import figures
    from dsink.artifacts import read_corrupted, read_logits, read_validation, write_json
    from dsink.data.sources import load_source
    from dsink.errors import DsinkError
    from dsink.evaluation import average_probabilities, balanced_predictions, evaluate_models
    from dsink.params import load_params

    params = load_params(args.params)
    index = read_corrupted(args.corrupted)
    test_labels = load_source(params.data).test.labels
    val_path = Path(args.val)
    if val_path.is_file():
        val = read_validation(val_path, index)
    elif params.data.validation.per_class:
        raise DsinkError(
            f"{val_path}: file not found, but data.validation.per_class = "
            f"{params.data.validation.per_class}; rerun `dvc repro corrupt`"
        )
    else:
        val = None
    val_ids = val.sample_id if val is not None else None
    paths = {
        "dsink": args.student_logits,
        "imbalance_teacher": args.imbalance_logits,
        "noise_teacher": args.noise_logits,
        "ce": f"{args.baselines}/ce/logits.parquet",
        "la_small_loss": f"{args.baselines}/la_small_loss/logits.parquet",
    }
    files = {name: read_logits(p, index, test_labels.size, val_ids=val_ids) for name, p in paths.items()}
    # one space for every comparison: the balanced one
    logits: dict = {name: balanced_predictions(files[name], index, paths[name]) for name in paths}
    logits["teacher_average"] = average_probabilities(logits["imbalance_teacher"], logits["noise_teacher"])
    order = ("dsink", "imbalance_teacher", "noise_teacher", "teacher_average", "ce", "la_small_loss")
    logits = {name: logits[name] for name in order}
    ep = params.evaluate
    metrics, tables = evaluate_models(
        logits,
        test_labels,
        index,
        ep.many_threshold,
        ep.few_threshold,
        val_labels=val.label if val is not None else None,
    )
    metrics["noise_rate"] = noise_rate_report(files["noise_teacher"].meta, index.meta, args.noise_logits)
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
        "la_small_loss": Path(args.live) / "baseline_la_small_loss",
    }
    figures.curves_figure(live, plots / "curves.png")
    figures.corrected_figure(live, plots / "corrected.png")
    write_json(args.metrics, metrics)
    print("evaluate: every model read in the balanced space (raw + train_offset - train_log_prior)")
    for name in logits:
        m = metrics[name]
        v = m["val"]
        val_top1 = f"{v['top1']:.4f}" if v is not None else "-"
        print(
            f"evaluate: {name:18s} test top1 {m['top1']:.4f}  few {_fmt(m['few'])}  "
            f"corrected {_fmt(m['corrected'])}  val top1 {val_top1}"
        )
    nr = metrics["noise_rate"]
    print(
        f"evaluate: noise rate estimated by the noise teacher {_fmt(nr['estimate'])}, true {_fmt(nr['true'])}"
    )


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def noise_rate_report(teacher_meta: dict, index_meta: dict, where: str) -> dict:
    """``{"estimate": the noise teacher's noise_rate_estimate (null if absent), "true": realised rate}``."""
    from dsink.errors import DsinkError

    est = teacher_meta.get("noise_rate_estimate")
    if est is not None:
        if isinstance(est, bool) or not isinstance(est, (int, float)) or not 0.0 <= est <= 1.0:
            raise DsinkError(f"{where}: metadata noise_rate_estimate = {est!r}; expected a number in [0, 1]")
        est = float(est)
    true = index_meta.get("noise_rate")
    return {"estimate": est, "true": None if true is None else float(true)}


def cli(argv: list[str] | None = None) -> None:
    p = stage.parser(__doc__)
    stage.add_inputs(p, "corrupted", "val", "student-logits", "imbalance-logits", "noise-logits")
    p.add_argument(
        "--baselines", default="data/baselines", help="train_baseline outputs (<m>/logits.parquet)"
    )
    p.add_argument("--live", default="dvclive", help="dvclive root holding the trainings' curves")
    p.add_argument("--metrics", default="metrics/evaluate.json", help="metrics file")
    p.add_argument("--plots", default="plots", help="plots directory")
    stage.run(main, p, argv)


if __name__ == "__main__":
    cli()
