"""Paired significance tests (neobench.reporting.paired) against hand computations on small fixed inputs."""

import numpy as np
import pytest

from neobench.reporting.paired import compare, holm, mcnemar_exact, paired_bootstrap


def test_two_documents_bootstrap_matches_its_exact_distribution():
    # Differences 0 and 2: a resample of 2 documents has mean 0, 1 or 2 with chance 1/4, 1/2, 1/4.
    delta, low, high, p = paired_bootstrap(np.array([[0.0, 2.0]]), np.zeros((1, 2)), draws=40_000)
    assert delta == 1.0 and (low, high) == (0.0, 2.0)
    # Two-sided p: the share of draws at least |1| away from 1, i.e. means 0 or 2: 1/2.
    assert p == pytest.approx(0.5, abs=0.01)


def test_a_constant_difference_has_a_point_interval_and_the_smallest_p():
    delta, low, high, p = paired_bootstrap(np.full((1, 5), 3.0), np.ones((1, 5)), draws=99)
    assert (delta, low, high) == (2.0, 2.0, 2.0) and p == pytest.approx(1 / 100)


def test_identical_scores_give_zero_delta_and_p_one():
    scores = np.array([[0.3, 1.2, 0.7, 2.0], [0.4, 1.1, 0.9, 1.8]])
    result = compare(scores, scores.copy())
    assert (result.delta, result.low, result.high, result.p) == (0.0, 0.0, 0.0, 1.0)
    binary = np.array([[1, 0, 1, 1, 0]])
    assert compare(binary, binary.copy()).p == 1.0 and compare(binary, binary.copy()).test == "mcnemar"


def test_seeds_are_averaged_per_document_and_resampled_jointly():
    a = np.array([[1.0, 2.0, 3.0], [3.0, 4.0, 5.0]])  # seed means per document: 2, 3, 4
    b = np.array([[0.0, 1.0, 2.0], [2.0, 3.0, 4.0]])  # 1, 2, 3: every difference is 1
    delta, low, high, _ = paired_bootstrap(a, b, draws=500)
    assert delta == 1.0
    # Rows of equal index are the same seed: drawn jointly, a - b stays 1 in every draw.
    assert (low, high) == (1.0, 1.0)


def test_mcnemar_counts_only_discordant_pairs():
    a = [1, 1, 1, 1, 1, 0, 0, 1]
    b = [0, 0, 0, 0, 0, 0, 0, 1]  # 5 pairs a-only, 0 b-only: p = 2 * 0.5**5
    assert mcnemar_exact(a, b) == pytest.approx(0.0625)
    # 3 against 1: two-sided binomial(4, 1/2) p = 2 * (1 + 4) / 16 = 0.625
    assert mcnemar_exact([1, 1, 1, 0, 0], [0, 0, 0, 1, 0]) == pytest.approx(0.625)
    assert compare(np.array([a], float), np.array([b], float)).p == pytest.approx(0.0625)
    with pytest.raises(ValueError, match="0/1"):
        mcnemar_exact([0.5, 1], [1, 0])


def test_holm_multiplies_by_the_remaining_count_and_keeps_order():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.001]) == pytest.approx([0.5, 0.002])
    assert holm([0.4, 0.6]) == pytest.approx([0.8, 0.8])  # never below an earlier step, capped at 1
    assert holm([]) == []


def test_mismatched_documents_are_refused():
    with pytest.raises(ValueError, match="same documents"):
        paired_bootstrap(np.zeros((1, 3)), np.zeros((1, 4)))
