"""Per-epoch measurements during training: test top-1 and label repair on the training set.

Kept apart from :mod:`dsink.evaluation` (pure numpy metrics) because it runs models, so the
``evaluate`` stage does not depend on the training engine.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dsink.evaluation import balanced_logits, label_repair
from dsink.inference import predict_logits


def epoch_tracker(
    corpus: Any,
    device: Any,
    batch_size: int,
    train_offset: Any = None,
    train_log_prior: Any = None,
) -> Any:
    """A per-epoch callback for the engine: test top-1 and label repair on the training set.

    Measured in the space ``metrics/evaluate.json`` uses, so a curve's last point is the final metric
    and its best epoch compares with it: the argmax of ``raw + train_offset - train_log_prior``
    (:func:`dsink.evaluation.balanced_logits`). ``train_offset`` (C,) is what the model's raw logits
    need to become training-prior logits (None: they already are), ``train_log_prior`` (C,) the prior
    it trained under (None: raw argmax, e.g. for a model without a prior).
    """
    import torch

    test = corpus.source.test
    test_ids = np.arange(len(test))
    idx = corpus.index

    def space(z: np.ndarray) -> np.ndarray:
        if train_log_prior is None:
            return z
        return balanced_logits(z, train_offset, train_log_prior)

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        zt = predict_logits(model, test, test_ids, corpus.normalizer, device, batch_size, desc="test")
        ztr = predict_logits(
            model, corpus.source.train, idx.sample_id, corpus.normalizer, device, batch_size, desc="train"
        )
        record = {"test_top1": float((space(zt).argmax(1) == test.labels).mean())}
        repair = label_repair(space(ztr).argmax(1), idx.clean_label, idx.noisy_label)
        record.update({f"train_{k}": v for k, v in repair.items() if v is not None})
        return record

    return evaluate
