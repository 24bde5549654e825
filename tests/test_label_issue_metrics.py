import numpy as np
import pytest
from sklearn.metrics import f1_score, precision_score, recall_score, roc_auc_score

from dsink.label_issue_metrics import auroc, detection_scores, grouped_detection_scores


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    truth = rng.random(500) < 0.3
    score = np.round(rng.random(500) + 0.5 * truth, 1)  # coarse: many ties
    assert auroc(score, truth) == pytest.approx(roc_auc_score(truth, score), abs=1e-12)


def test_auroc_extremes_and_degenerate():
    truth = np.array([True, True, False, False])
    assert auroc(np.array([0.9, 0.8, 0.1, 0.2]), truth) == 1.0
    assert auroc(np.array([0.1, 0.2, 0.9, 0.8]), truth) == 0.0
    assert auroc(np.ones(4), truth) == 0.5
    assert auroc(np.ones(3), np.array([True, True, True])) is None


def test_detection_scores_match_sklearn():
    rng = np.random.default_rng(3)
    truth = rng.random(300) < 0.4
    flag = np.where(rng.random(300) < 0.8, truth, ~truth)
    s = detection_scores(flag, flag.astype(float), truth)
    assert s["precision"] == pytest.approx(precision_score(truth, flag))
    assert s["recall"] == pytest.approx(recall_score(truth, flag))
    assert s["f1"] == pytest.approx(f1_score(truth, flag))
    assert (s["num_flagged"], s["num_noisy"]) == (int(flag.sum()), int(truth.sum()))


def test_empty_denominators_are_none():
    s = detection_scores(np.zeros(3, bool), np.zeros(3), np.zeros(3, bool))
    assert s["precision"] is None and s["recall"] is None and s["f1"] is None and s["auroc"] is None


def test_groups_by_given_label():
    given = np.array([0, 0, 1, 1, 2, 2])
    truth = np.array([True, False, True, False, False, False])
    flag = np.array([True, False, False, True, True, True])
    out = grouped_detection_scores(flag, flag.astype(float), truth, given, {"many": [0], "few": [1, 2]})
    assert out["many"]["precision"] == 1.0 and out["many"]["recall"] == 1.0
    assert out["few"]["num_flagged"] == 3 and out["few"]["precision"] == 0.0
    assert out["overall"]["num_flagged"] == 4
