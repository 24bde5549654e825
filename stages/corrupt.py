"""DVC stage `corrupt`: hold out a validation split, make the rest long-tailed and label-noisy.

Reads `seed` and `data` from params.yaml; writes data/corrupted/train.parquet, data/corrupted/val.parquet
(`data.validation.per_class` clean images per class, held out of the source training set before the long
tail; zero rows when it is 0) and metrics/corrupt.json.
"""

from __future__ import annotations

import argparse

from dsink import stage


def main(args: argparse.Namespace) -> None:
    from dsink.artifacts import write_corrupted, write_json, write_validation
    from dsink.corrupt import corrupt_labels, corrupt_metrics, validation_split
    from dsink.data.sources import load_source
    from dsink.params import load_params

    params = load_params(args.params)
    src = load_source(params.data)
    labels, C, names = src.train.labels, src.num_classes, src.class_names
    val = validation_split(labels, C, names, params.data, params.seed)
    idx = corrupt_labels(labels, C, names, params.data, params.seed, exclude=val.sample_id)
    metrics = corrupt_metrics(idx, val)
    write_corrupted(args.out, idx)
    write_validation(args.val_out, val)
    write_json(args.metrics, metrics)
    print(
        f"corrupt: {metrics['num_samples']} samples kept, realised noise rate {metrics['noise_rate']:.4f}, "
        f"imbalance ratio {metrics['imbalance_ratio']:.1f}; {metrics['num_val']} held out for validation"
    )


def cli(argv: list[str] | None = None) -> None:
    p = stage.parser(__doc__)
    p.add_argument(
        "--out", default="data/corrupted/train.parquet", help="corrupted index (default: %(default)s)"
    )
    p.add_argument(
        "--val-out", default="data/corrupted/val.parquet", help="validation split (default: %(default)s)"
    )
    p.add_argument("--metrics", default="metrics/corrupt.json", help="metrics file (default: %(default)s)")
    stage.run(main, p, argv)


if __name__ == "__main__":
    cli()
