import numpy as np
import pytest

from ctr.metrics import auc, auc_interval, delong, delong_test, group_auc, logloss, normalized_entropy


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


def test_group_auc_by_hand_with_one_class_groups_and_ties() -> None:
    labels = np.array([1, 0, 1, 0, 1, 1, 1, 0, 1, 0, 1])
    scores = np.array([0.9, 0.5, 0.4, 0.3, 0.8, 0.1, 0.2, 0.2, 0.2, 0.6, 0.7])
    groups = np.array(list("AAABBCCDDDD"))
    # A: positives 0.9, 0.4 against 0.5 -> 1/2; B: 0.8 over 0.3 -> 1; C: clicks only, skipped;
    # D: positive 0.2 ties 0.2 (1/2) and loses to 0.6, positive 0.7 beats both -> 2.5 / 4
    result = group_auc(labels, scores, groups)
    assert result["group_auc"] == pytest.approx((3 * 0.5 + 2 * 1.0 + 4 * 0.625) / 9)
    assert (result["groups"], result["groups_scored"], result["groups_skipped_one_class"]) == (4, 3, 1)
    assert result["impressions"] == 11
    assert [b["size"] for b in result["by_size"]] == ["1", "2-9", "10-99", "100-999", "1000+"]
    assert result["by_size"][1]["groups"] == 4 and result["by_size"][0]["group_auc"] is None


def test_group_auc_equals_the_plain_auc_of_one_group() -> None:
    rng = np.random.default_rng(0)
    labels, scores = rng.integers(0, 2, 500), rng.random(500).round(2)  # rounded: many ties
    assert group_auc(labels, scores, np.zeros(500))["group_auc"] == pytest.approx(auc(labels, scores))
