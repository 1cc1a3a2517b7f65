import numpy as np
import pytest

from leukemia.evaluation.thresholds import choose_threshold


def test_fixed_rule_is_half():
    choice = choose_threshold(np.array([0, 1]), np.array([0.2, 0.9]), rule="fixed")

    assert choice.threshold == 0.5
    assert choice.rule == "fixed at 0.5"


def test_f1_rule_separates_classes():
    targets = np.array([0, 0, 0, 1, 1, 1])
    probs = np.array([0.70, 0.72, 0.74, 0.80, 0.85, 0.90])

    choice = choose_threshold(targets, probs, rule="f1_weighted")

    assert 0.74 < choice.threshold <= 0.80
    assert "weighted F1" in choice.rule


def test_sensitivity_rule_reaches_target():
    rng = np.random.default_rng(0)
    targets = np.repeat([0, 1], 200)
    probs = np.clip(rng.normal(0.35, 0.15, 400) + 0.3 * targets, 0, 1)

    choice = choose_threshold(targets, probs, rule="sensitivity", target_sensitivity=0.9)

    sensitivity = np.mean(probs[targets == 1] >= choice.threshold)
    assert sensitivity >= 0.9
    assert np.mean(probs[targets == 1] >= choice.threshold + 1e-6) < 0.9


def test_one_class_rejected():
    with pytest.raises(ValueError, match="both classes"):
        choose_threshold(np.array([1, 1]), np.array([0.2, 0.9]), rule="f1_weighted")


def test_unknown_rule_rejected():
    with pytest.raises(ValueError, match="invalid threshold rule"):
        choose_threshold(np.array([0, 1]), np.array([0.2, 0.9]), rule="youden")
