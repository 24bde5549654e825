"""DVC stage `corrupt`: make the source training set long-tailed and label-noisy.

Reads `seed` and `data` from params.yaml; writes data/corrupted/train.parquet and metrics/corrupt.json.
"""

from __future__ import annotations

import argparse

from dsink import stage


def main(args: argparse.Namespace) -> None:
    from dsink.artifacts import write_corrupted, write_json
    from dsink.corrupt import corrupt_labels, corrupt_metrics
    from dsink.data.sources import load_source
    from dsink.params import load_params

    params = load_params(args.params)
    src = load_source(params.data)
    idx = corrupt_labels(src.train.labels, src.num_classes, src.class_names, params.data, params.seed)
    metrics = corrupt_metrics(idx)
    write_corrupted(args.out, idx)
    write_json(args.metrics, metrics)
    print(
        f"corrupt: {metrics['num_samples']} samples kept, realised noise rate {metrics['noise_rate']:.4f}, "
        f"imbalance ratio {metrics['imbalance_ratio']:.1f}"
    )


def cli(argv: list[str] | None = None) -> None:
    p = stage.parser(__doc__)
    p.add_argument(
        "--out", default="data/corrupted/train.parquet", help="corrupted index (default: %(default)s)"
    )
    p.add_argument("--metrics", default="metrics/corrupt.json", help="metrics file (default: %(default)s)")
    stage.run(main, p, argv)


if __name__ == "__main__":
    cli()
