"""DVC stage `dump_logits@<role>`: a teacher's logits on every training sample and the test set.

Reads `seed`, `data`, `teachers.<role>` (architecture, loss and `folds`, for the model file and the
metadata) and `dump`, data/teachers/<role>/model.pt, and data/teachers/<role>/estimate.json when it
exists (its `noise_rate_estimate` goes into the metadata); writes data/logits/<role>.parquet exactly as
contract.md says. With `folds: 1` the training rows are in-sample (the model trained on them); with
`folds: k >= 2` they are out of fold (each from the fold model that held the sample out) and test and
val rows are the mean of the k fold models' raw logits. The metadata records `folds`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dsink import stage


def read_estimate(path: Path) -> float | None:
    """``noise_rate_estimate`` of the training stage's JSON; None when absent (a model from elsewhere)."""
    from dsink.errors import DsinkError

    if not path.exists():
        return None
    try:
        value = json.loads(path.read_text()).get("noise_rate_estimate")
    except (OSError, ValueError, AttributeError) as exc:
        raise DsinkError(f"{path}: expected a JSON object with 'noise_rate_estimate' ({exc})") from exc
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise DsinkError(f"{path}: noise_rate_estimate = {value!r}; expected a share in [0, 1] or null")
    return float(value)


def main(args: argparse.Namespace) -> None:
    from dsink.dump import load_teacher, teacher_logits, write_model_logits
    from dsink.params import load_params
    from dsink.runs import open_corpus
    from dsink.teachers import recipe_for

    params = load_params(args.params)
    estimate = read_estimate(Path(args.estimate or f"data/teachers/{args.role}/estimate.json"))
    corpus = open_corpus(params, args.corrupted)
    tp = getattr(params.teachers, args.role)
    model_path = args.model or f"data/teachers/{args.role}/model.pt"
    out = args.out or f"data/logits/{args.role}.parquet"
    teacher = load_teacher(
        tp.model,
        model_path,
        corpus.index.num_classes,
        corpus.source.channels,
        tp.folds,
        corpus.index.sample_id,
        f"teachers.{args.role}.folds",
    )
    z = teacher_logits(teacher, corpus, params.dump.batch_size, f"dump[{args.role}]")
    recipe = recipe_for(args.role, tp, corpus.index)
    meta = {
        "role": args.role,
        "method": tp.method,
        "model": tp.model,
        "space": recipe.space,
        "train_offset": [float(v) for v in recipe.train_offset.tolist()],
        "folds": tp.folds,
    }
    if estimate is not None:
        meta["noise_rate_estimate"] = estimate
    write_model_logits(out, z, corpus, meta)
    print(f"dump[{args.role}]: {len(z.train)} train + {len(z.test)} test + {len(z.val)} val rows -> {out}")


def cli(argv: list[str] | None = None) -> None:
    p = stage.parser(__doc__)
    p.add_argument("--role", required=True, choices=("imbalance", "noise"), help="which teacher")
    stage.add_inputs(p, "corrupted")
    p.add_argument(
        "--model",
        default=None,
        help="model file: a state dict, or the fold models with folds >= 2 "
        "(default: data/teachers/<role>/model.pt)",
    )
    p.add_argument("--out", default=None, help="output Parquet (default: data/logits/<role>.parquet)")
    p.add_argument(
        "--estimate",
        default=None,
        help="noise-rate estimate JSON (default: data/teachers/<role>/estimate.json)",
    )
    stage.run(main, p, argv)


if __name__ == "__main__":
    cli()
