"""Per-epoch measurements during training: test top-1 and label repair on the training set.

Kept apart from :mod:`dsink.evaluation` (pure numpy metrics) because it runs models, so the
``evaluate`` stage does not depend on the training engine.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dsink.engine import predict_logits
from dsink.evaluation import label_repair


def epoch_tracker(corpus: Any, device: Any, batch_size: int) -> Any:
    """A per-epoch callback for the engine: test top-1 and label repair on the training set.

    Predictions are the argmax of raw logits everywhere (the model's own classification), as in
    ``metrics/evaluate.json``.
    """
    import torch

    test = corpus.source.test
    test_ids = np.arange(len(test))
    idx = corpus.index

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        zt = predict_logits(model, test, test_ids, corpus.normalizer, device, batch_size, desc="test")
        ztr = predict_logits(
            model, corpus.source.train, idx.sample_id, corpus.normalizer, device, batch_size, desc="train"
        )
        record = {"test_top1": float((zt.argmax(1) == test.labels).mean())}
        repair = label_repair(ztr.argmax(1), idx.clean_label, idx.noisy_label)
        record.update({f"train_{k}": v for k, v in repair.items() if v is not None})
        return record

    return evaluate
