import numpy as np
import pytest

from ctr.metrics import auc, auc_interval, delong, delong_test, logloss, normalized_entropy


def test_auc_counts_ties_as_half() -> None:
    # positives score 0.8 and 0.5; negatives 0.5 and 0.2: pairs (0.8>0.5), (0.8>0.2), (0.5=0.5 -> 1/2), (0.5>0.2)
    assert auc(np.array([1, 1, 0, 0]), np.array([0.8, 0.5, 0.5, 0.2])) == pytest.approx(3.5 / 4)


def test_auc_perfect_and_reversed() -> None:
    y = np.array([0, 0, 1, 1])
    assert auc(y, np.array([0.1, 0.2, 0.3, 0.4])) == 1.0
    assert auc(y, np.array([0.4, 0.3, 0.2, 0.1])) == 0.0


def test_auc_needs_both_classes() -> None:
    with pytest.raises(ValueError, match="both classes"):
        auc(np.array([1, 1]), np.array([0.1, 0.2]))


def test_logloss_and_normalized_entropy() -> None:
    y = np.array([1, 0])
    assert logloss(y, np.array([0.5, 0.5])) == pytest.approx(np.log(2))
    # predicting the base rate has NE exactly 1
    assert normalized_entropy(np.array([1, 0, 0, 0]), np.full(4, 0.25)) == pytest.approx(1.0)


@pytest.mark.parametrize("tied", [False, True])
def test_metrics_match_scikit_learn(tied: bool) -> None:
    from sklearn.metrics import log_loss, roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 5_000)
    p = rng.random(5_000)
    if tied:  # heavy ties: scores rounded to one decimal
        p = np.round(p, 1).clip(0.05, 0.95)
    assert auc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert logloss(y, p) == pytest.approx(log_loss(y, p), abs=1e-9)


def test_delong_variance_of_a_worked_example() -> None:
    # positives 0.9, 0.4; negatives 0.5, 0.2, 0.1. Structural components: V10 = (1, 2/3),
    # V01 = (1/2, 1, 1); AUC = 5/6; S10 = 1/18, S01 = 1/12; var = S10/2 + S01/3 = 1/18
    labels = np.array([1, 1, 0, 0, 0])
    scores = np.array([0.9, 0.4, 0.5, 0.2, 0.1])
    aucs, cov = delong(labels, scores)
    assert aucs[0] == pytest.approx(5 / 6)
    assert cov[0, 0] == pytest.approx(1 / 18)


def test_delong_ties_and_agreement_with_the_rank_auc() -> None:
    rng = np.random.default_rng(0)
    labels = rng.random(3000) < 0.3
    a = np.round(rng.random(3000) + labels * 0.3, 2)  # rounded: many ties
    b = a + rng.normal(0, 0.2, 3000)
    aucs, cov = delong(labels, a, b)
    assert aucs[0] == pytest.approx(auc(labels, a)) and aucs[1] == pytest.approx(auc(labels, b))
    assert cov[0, 1] == pytest.approx(cov[1, 0]) and cov[0, 0] > 0
    value, low, high = auc_interval(labels, a)
    assert low < value < high and high - low == pytest.approx(2 * 1.959964 * np.sqrt(cov[0, 0]), rel=1e-5)
    same = delong_test(labels, a, a)
    assert same["difference"] == 0 and same["p_value"] == 1.0
    test = delong_test(labels, a, b)
    assert test["difference"] > 0 and test["p_value"] < 0.05  # b is a plus noise: clearly worse
