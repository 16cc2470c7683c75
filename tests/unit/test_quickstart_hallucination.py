"""The rank correlation the quickstart reports for its reward model, against hand computation."""

import math

from vlmalign.quickstart.hallucination import spearman


def test_spearman_by_hand():
    # ranks of y = [1, 0, 0, -2] are [4, 2.5, 2.5, 1] (ties share their mean rank); against x's
    # [1, 2, 3, 4]: deviations [-1.5, -.5, .5, 1.5] and [1.5, 0, 0, -1.5], covariance -4.5,
    # squares 5 and 4.5: r = -4.5 / sqrt(22.5)
    assert math.isclose(spearman([1, 2, 3, 4], [1, 0, 0, -2]), -4.5 / math.sqrt(22.5))
    assert spearman([0.1, 5, 7], [1, 2, 30]) == 1.0               # monotone, not linear: still 1
    assert math.isnan(spearman([1, 2, 3], [5, 5, 5]))              # a constant side has no ranking
