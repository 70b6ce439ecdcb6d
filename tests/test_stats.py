"""The report's statistics against scipy's: the sample standard deviation and Welch's two-sided t-test."""
import random

import pytest
from scipy import stats as reference

from llm.stats import incomplete_beta, mean_std, welch_p_value


@pytest.mark.parametrize("sizes", [(2, 2), (2, 5), (3, 3), (10, 4)])
def test_welch_p_value_matches_scipy(sizes):
    rng = random.Random(sum(sizes))
    for _ in range(50):
        a = [rng.gauss(0, 1) for _ in range(sizes[0])]
        b = [rng.gauss(rng.uniform(-1, 1), rng.uniform(0.1, 3)) for _ in range(sizes[1])]
        assert welch_p_value(a, b) == pytest.approx(reference.ttest_ind(a, b, equal_var=False).pvalue, abs=1e-10)


def test_edge_cases():
    assert welch_p_value([1.0], [1.0, 2.0]) is None  # one seed: no spread to test against
    assert welch_p_value([1.0, 1.0], [1.0, 1.0]) == 1.0 and welch_p_value([1.0, 1.0], [2.0, 2.0]) == 0.0
    assert mean_std([2.0]) == (2.0, None)
    assert mean_std([1.0, 2.0, 4.0])[1] == pytest.approx(reference.tstd([1.0, 2.0, 4.0]))
    assert incomplete_beta(0.3, 2.0, 3.0) == pytest.approx(reference.beta.cdf(0.3, 2.0, 3.0), abs=1e-12)
    assert incomplete_beta(0.0, 2.0, 3.0) == 0.0 and incomplete_beta(1.0, 2.0, 3.0) == 1.0
