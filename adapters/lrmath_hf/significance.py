"""Paired significance tests for comparing two compressed models on the same examples.

McNemar's exact test for per-example correctness (a classifier or linear probe), and
Wilcoxon's exact signed-rank test for per-example scores (e.g. feature cosines), with
dependent examples (crops of one photo) grouped first. Re-exported by
:mod:`lrmath_hf.evaluate`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.stats

__all__ = ["PairedTest", "paired_accuracy_test", "PairedScoreTest", "paired_score_test"]


@dataclass(frozen=True)
class PairedTest:
    """Two classifiers scored on the same examples: discordant counts and McNemar's exact p-value."""

    only_a: int  # examples A gets right and B gets wrong
    only_b: int  # examples B gets right and A gets wrong
    n: int
    p_value: float

    @property
    def difference(self) -> float:
        """Accuracy of A minus accuracy of B."""
        return (self.only_a - self.only_b) / self.n


def paired_accuracy_test(correct_a, correct_b) -> PairedTest:
    """McNemar's exact test that two models scored on the same examples are equally accurate.

    Parameters
    ----------
    correct_a, correct_b : array of bool, shape (n,)
        Per-example correctness of each model on the same examples, in the same order.

    Returns
    -------
    PairedTest

    Notes
    -----
    Only the discordant examples carry information: under the null hypothesis
    each of the ``b + c`` of them is equally likely to favour either model, so
    ``p = P(|Bin(b + c, 1/2) - (b + c)/2| >= |b - (b + c)/2|)`` (two-sided,
    exact; ``p = 1`` when there are none). McNemar, Psychometrika 12 (1947).
    Unpaired intervals on each accuracy would ignore that both models see the
    same, mostly easy, examples, and would call far fewer differences real.
    """
    a = np.asarray(correct_a, dtype=bool).reshape(-1)
    b = np.asarray(correct_b, dtype=bool).reshape(-1)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"correct_a and correct_b must be non-empty and of one length, got {a.size} and {b.size}")
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(b & ~a))
    discordant = only_a + only_b
    p = 1.0 if discordant == 0 else float(scipy.stats.binomtest(only_a, discordant, 0.5).pvalue)
    return PairedTest(only_a, only_b, int(a.size), min(p, 1.0))


@dataclass(frozen=True)
class PairedScoreTest:
    """Two models scored on the same examples by a continuous score: Wilcoxon's signed-rank test."""

    mean_difference: float  # mean over units of score A minus score B
    wins_a: int  # units where A scores higher
    wins_b: int
    n: int  # units compared (groups, when examples are grouped)
    p_value: float


def paired_score_test(scores_a, scores_b, groups=None) -> PairedScoreTest:
    """Wilcoxon's exact signed-rank test that two models' per-example scores have the same centre.

    Parameters
    ----------
    scores_a, scores_b : array of float, shape (n,)
        Per-example scores of each model (e.g. CLS cosine), same examples, same order.
    groups : array of int, shape (n,), optional
        Examples with one group id are not independent (e.g. crops of one photo): each
        group's scores are averaged first, and the groups are the units of the test.

    Returns
    -------
    PairedScoreTest

    Notes
    -----
    With ``d_u`` the unit differences, the statistic is the smaller rank sum of the
    positive and negative ``d_u`` (zeros dropped); its null distribution is exact
    for small ``n`` (Wilcoxon, Biometrics Bulletin 1 (1945); ``scipy.stats.wilcoxon``).
    With ``n`` units the smallest two-sided p-value is ``2 / 2^n`` (0.0078 at n = 8),
    so a handful of units can only show large, consistent differences.
    """
    a = np.asarray(scores_a, dtype=np.float64).reshape(-1)
    b = np.asarray(scores_b, dtype=np.float64).reshape(-1)
    if a.shape != b.shape or a.size == 0 or not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise ValueError(f"scores_a and scores_b must be finite, non-empty and of one length, got {a.size} and {b.size}")
    if groups is not None:
        g = np.asarray(groups).reshape(-1)
        if g.shape != a.shape:
            raise ValueError(f"groups must have one id per score, got {g.size} for {a.size}")
        ids = np.unique(g)
        a = np.array([a[g == i].mean() for i in ids])
        b = np.array([b[g == i].mean() for i in ids])
    d = a - b
    wins_a, wins_b = int(np.sum(d > 0)), int(np.sum(d < 0))
    if wins_a + wins_b == 0:
        p = 1.0
    else:
        p = float(scipy.stats.wilcoxon(d[d != 0], method="exact").pvalue)
    return PairedScoreTest(float(d.mean()), wins_a, wins_b, int(d.size), min(p, 1.0))
