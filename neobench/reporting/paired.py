"""Paired significance tests: two students scored on the very same documents.

Every student is evaluated on the same prompts, so a comparison should look at the per-document
differences, not at two independent intervals (which ignore that both models find the same
documents hard). Pure functions on arrays; :mod:`neobench.reporting.comparisons` applies them to stored rows.

    paired_bootstrap   mean paired difference, 95% percentile interval and a two-sided p-value,
                       resampling documents (shared by both sides) and each side's seeds
    mcnemar_exact      exact McNemar test for a 0/1 metric of two single runs
    holm               Holm's step-down adjustment of a family of p-values
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

BOOTSTRAP_DRAWS = 10_000
BOOTSTRAP_SEED = 0
ALPHA = 0.05


@dataclass(frozen=True)
class Comparison:
    delta: float
    """mean over documents of (a - b), each side first averaged over its seeds"""
    low: float
    high: float
    """95% paired-bootstrap interval of delta"""
    p: float
    """two-sided p-value of delta = 0 (bootstrap, or exact McNemar for a 0/1 metric of single runs)"""
    test: str
    """"bootstrap" or "mcnemar\""""
    n_docs: int
    seeds: tuple[int, int]


def paired_bootstrap(a: np.ndarray, b: np.ndarray, draws: int = BOOTSTRAP_DRAWS, seed: int = BOOTSTRAP_SEED) -> tuple[float, float, float, float]:
    """(delta, low, high, p) for per-document scores ``a`` [seeds_a, docs] and ``b`` [seeds_b, docs].

    Columns are the same documents in the same order; rows are seeds, row i of both sides the same
    seed when their counts agree. Each draw resamples the documents (the same draw for both sides,
    which is what makes it paired) and the seeds (jointly when rows match, else per side);
    delta* is the mean over drawn documents of (mean over a's drawn seeds - mean over b's).
    The interval is the 2.5th-97.5th percentile of delta*. The p-value is the share of draws at
    least as far from delta-hat as delta-hat is from 0 (the bootstrap distribution shifted to the
    null), counted as (1 + hits) / (1 + draws) so that it is never 0.
    """
    a, b = np.atleast_2d(np.asarray(a, dtype=np.float64)), np.atleast_2d(np.asarray(b, dtype=np.float64))
    if a.shape[1] != b.shape[1] or a.shape[1] == 0:
        raise ValueError(f"paired scores need the same documents on both sides, got {a.shape[1]} and {b.shape[1]}")
    delta = float(a.mean(axis=0).mean() - b.mean(axis=0).mean())
    rng = np.random.default_rng(seed)
    n_docs = a.shape[1]
    docs = rng.integers(0, n_docs, size=(draws, n_docs))
    # A run is the unit of a seed: each draw picks seeds (with replacement) once, averages them per
    # document, then takes the drawn documents of the difference. Rows of equal index are the same
    # seed (the same examples in the same order), so equal seed counts are drawn jointly.
    pick_a = rng.integers(0, a.shape[0], size=(draws, a.shape[0]))
    pick_b = pick_a if a.shape[0] == b.shape[0] else rng.integers(0, b.shape[0], size=(draws, b.shape[0]))
    side_a, side_b = a[pick_a].mean(axis=1), b[pick_b].mean(axis=1)  # [draws, docs]
    diff = np.take_along_axis(side_a - side_b, docs, axis=1)
    stats = diff.mean(axis=1)
    low, high = np.percentile(stats, [2.5, 97.5])
    hits = int(np.sum(np.abs(stats - delta) >= abs(delta) - 1e-12))
    p = min(1.0, (1 + hits) / (1 + draws))
    return delta, float(low), float(high), p


def mcnemar_exact(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided exact McNemar p-value for paired 0/1 outcomes: a binomial test of the discordant
    pairs (a right, b wrong) against (a wrong, b right) with p = 1/2; no discordant pair gives 1."""
    from scipy.stats import binomtest

    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError("McNemar needs the same documents on both sides")
    if not (np.isin(a, (0, 1)).all() and np.isin(b, (0, 1)).all()):
        raise ValueError("McNemar needs 0/1 outcomes")
    only_a = int(np.sum((a == 1) & (b == 0)))
    only_b = int(np.sum((a == 0) & (b == 1)))
    if only_a + only_b == 0:
        return 1.0
    return float(binomtest(only_a, only_a + only_b, 0.5).pvalue)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values, in the input order: the k-th smallest of m is multiplied by m - k + 1,
    then made non-decreasing in that order and capped at 1. Reject where the adjusted p < alpha."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def is_binary(values: np.ndarray) -> bool:
    return bool(np.isin(values, (0.0, 1.0)).all())


def compare(a: np.ndarray, b: np.ndarray, draws: int = BOOTSTRAP_DRAWS, seed: int = BOOTSTRAP_SEED) -> Comparison:
    """Paired comparison of per-document scores a [seeds_a, docs] vs b [seeds_b, docs].

    The interval always comes from the paired bootstrap. The p-value is exact McNemar for a 0/1
    metric when each side is a single run (McNemar pairs one outcome with one outcome); otherwise
    the bootstrap's, which also resamples seeds.
    """
    a, b = np.atleast_2d(np.asarray(a, dtype=np.float64)), np.atleast_2d(np.asarray(b, dtype=np.float64))
    delta, low, high, p = paired_bootstrap(a, b, draws, seed)
    test = "bootstrap"
    if a.shape[0] == 1 and b.shape[0] == 1 and is_binary(a) and is_binary(b):
        p, test = mcnemar_exact(a[0], b[0]), "mcnemar"
    return Comparison(delta, low, high, p, test, a.shape[1], (a.shape[0], b.shape[0]))


def significance_mark(p_adjusted: Optional[float], alpha: float = ALPHA) -> str:
    return "*" if p_adjusted is not None and p_adjusted < alpha else ""
