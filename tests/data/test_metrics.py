"""ANLS and accuracy against hand-computed cases (the CookBook scripts' evaluation)."""

from __future__ import annotations

import logging

import pytest

from phi3v_core.data.metrics import accuracy, anls, anls_score, compute_metric, normalize_answer, normalize_prediction


@pytest.mark.parametrize(
    ("prediction", "references", "expected"),
    [
        ("Pepsi", ["Pepsi"], 1.0),
        ("helo", ["hello"], 0.8),  # one deletion: NL = 1/5
        ("kitten", ["sitting"], 1 - 3 / 7),  # classic distance 3 over max length 7
        ("ab", ["ac"], 0.0),  # NL = 0.5 is not < τ
        ("abcd", ["abce"], 0.75),  # NL = 0.25
        ("1,234.50", ["$1,234.50", "1,234.50"], 1.0),  # max over references
        ("  42. ", ["42"], 1.0),  # strip() then strip('.')
        ("...", ["42"], 0.0),  # empty after normalisation
        ("", ["42"], 0.0),
        ("PEPSI", ["Pepsi"], 0.0),  # case kept: NL = 4/5
        ("Pepsi", ["pepsi", "PEPSI"], 0.8),  # best reference "pepsi": one substitution
        ("x", [""], 0.0),  # empty reference: NL = 1
    ],
)
def test_anls_score_hand_computed(prediction: str, references: list[str], expected: float) -> None:
    assert anls_score(prediction, references) == pytest.approx(expected)


def test_anls_case_insensitive_variant_lowercases_both_sides() -> None:
    assert anls_score("PEPSI", ["Pepsi"], case_sensitive=False) == 1.0
    assert anls_score("PEPSI", ["Pepsi"], case_sensitive=True) == 0.0


def test_anls_threshold_is_configurable() -> None:
    assert anls_score("ab", ["ac"], threshold=0.6) == pytest.approx(0.5)


def test_anls_mean_over_questions_and_empty_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="phi3v_core.data.metrics"):
        score = anls(["Pepsi", "helo", " ."], [["Pepsi"], ["hello"], ["x"]])
    assert score == pytest.approx((1.0 + 0.8 + 0.0) / 3)
    assert "1 of 3 predictions are empty and score 0" in caplog.text


def test_anls_rejects_unpaired_inputs() -> None:
    with pytest.raises(ValueError, match="got 1 predictions for 2 questions"):
        anls(["a"], [["a"], ["b"]])
    with pytest.raises(ValueError, match="no predictions to score"):
        anls([], [])
    with pytest.raises(ValueError, match="at least one reference"):
        anls_score("a", [])


def test_normalisations() -> None:
    assert normalize_prediction("  The Answer.. ") == "The Answer"
    assert normalize_answer("  Yes. ") == "yes"
    assert normalize_answer(".No.") == "no"


@pytest.mark.parametrize(
    ("predictions", "references", "expected"),
    [
        (["Yes."], [["yes"]], 1.0),
        ([" No "], [["No."]], 1.0),
        (["True"], [["False"]], 0.0),
        (["ApplyEyeMakeup"], [["applyeyemakeup"]], 1.0),
        (["yes", "no", "maybe", "Archery"], [["Yes"], ["yes"], ["maybe."], ["Archery"]], 0.75),
        (["b"], [["a", "B"]], 1.0),  # any reference counts
        (["yes please"], [["yes"]], 0.0),  # exact match, not prefix
    ],
)
def test_accuracy_hand_computed(predictions: list[str], references: list[list[str]], expected: float) -> None:
    assert accuracy(predictions, references) == pytest.approx(expected)


def test_compute_metric_dispatch() -> None:
    assert compute_metric("anls", ["helo"], [["hello"]]) == pytest.approx(0.8)
    assert compute_metric("anls", ["HELLO"], [["hello"]], case_sensitive=False) == 1.0
    assert compute_metric("accuracy", ["Yes"], [["yes"]]) == 1.0
    with pytest.raises(ValueError, match="unknown metric 'bleu'; choose one of anls, accuracy"):
        compute_metric("bleu", ["a"], [["a"]])
