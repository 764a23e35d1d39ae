"""bench's step breakdown arithmetic."""

import pytest

from edsr_dist.perf.machine import median_interval
from edsr_dist.perf.measure import PHASES
from edsr_dist.perf.measure import step_phases as _step_phases


def test_step_phases_partition_the_step():
    # previous step ended at 10.0; queue wait 0.2 of a 0.3 gap; backward ends at 11.5 but the last gradient bucket
    # was handed to the all-reduce at 11.3: 0.2 of exposed wait.
    step = {"start": 10.3, "end": 12.0, "data_wait": 0.2, "to_device": 0.05, "finish_gradients_first": 11.5,
            "finish_gradients": 0.01, "overflow_check": 0.04, "optimizer": 0.3, "last_bucket": 11.3,
            "first_bucket": 11.0, "last_reduced": 11.45}
    phases = _step_phases(10.0, step)
    assert sum(phases[key] for key in PHASES) == pytest.approx(2.0)
    assert phases["data_wait"] == pytest.approx(0.2)
    assert phases["loop_other"] == pytest.approx(0.1)
    assert phases["forward_backward"] == pytest.approx(1.2 - 0.05 - 0.2)
    assert phases["allreduce_wait"] == pytest.approx(0.2 + 0.01 + 0.04)
    assert phases["optimizer"] == pytest.approx(0.3)
    assert phases["allreduce_in_flight"] == pytest.approx(0.45)


@pytest.mark.parametrize("n, low, high", [(5, 1, 5), (6, 1, 6), (10, 2, 9), (20, 6, 15), (100, 40, 61)])
def test_median_interval_is_the_sign_tests_order_statistics(n, low, high):
    """The 95% interval of the median of n values is (x_k, x_(n+1-k)) with the largest k whose binomial tails
    leave 95% (the published table: k = 2 for n = 10, 6 for n = 20, 40 for n = 100); fewer than 6 values: the range."""
    assert median_interval([float(i) for i in range(1, n + 1)]) == (low, high)
    assert median_interval([float(i) for i in range(n, 0, -1)][::-1], confidence=0.5)[0] >= low
