"""DVC stage `dump_logits@<role>`: a teacher's logits on every training sample and the test set.

Reads `seed`, `data`, `teachers.<role>` (architecture and loss, for the metadata) and `dump`; writes
data/logits/<role>.parquet exactly as contract.md says.
"""

from __future__ import annotations

import argparse

from dsink import stage


def main(args: argparse.Namespace) -> None:
    from dsink.dump import load_model, model_logits, write_model_logits
    from dsink.params import load_params
    from dsink.runs import open_corpus
    from dsink.teachers import recipe_for

    params = load_params(args.params)
    corpus = open_corpus(params, args.corrupted)
    tp = getattr(params.teachers, args.role)
    model_path = args.model or f"data/teachers/{args.role}/model.pt"
    out = args.out or f"data/logits/{args.role}.parquet"
    model = load_model(tp.model, model_path, corpus.index.num_classes, corpus.source.channels)
    z = model_logits(model, corpus, params.dump.batch_size, f"dump[{args.role}]")
    recipe = recipe_for(args.role, tp, corpus.index, float(corpus.index.meta.get("noise_rate", 0.0)))
    meta = {
        "role": args.role,
        "method": tp.method,
        "model": tp.model,
        "space": recipe.space,
        "train_offset": [float(v) for v in recipe.train_offset.tolist()],
    }
    write_model_logits(out, z, corpus, meta)
    print(f"dump[{args.role}]: {len(z.train)} train + {len(z.test)} test + {len(z.val)} val rows -> {out}")


def cli(argv: list[str] | None = None) -> None:
    p = stage.parser(__doc__)
    p.add_argument("--role", required=True, choices=("imbalance", "noise"), help="which teacher")
    p.add_argument("--corrupted", default="data/corrupted/train.parquet", help="corrupted index")
    p.add_argument("--model", default=None, help="model state dict (default: data/teachers/<role>/model.pt)")
    p.add_argument("--out", default=None, help="output Parquet (default: data/logits/<role>.parquet)")
    stage.run(main, p, argv)


if __name__ == "__main__":
    cli()
