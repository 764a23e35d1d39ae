"""cli.signals_after_imports: a signal that arrives while a command's modules import is acted on after them."""

from __future__ import annotations

import os
import signal

import pytest

from edsr_dist.cli import signals_after_imports
from edsr_dist.errors import Terminated


@pytest.mark.parametrize("signum, raised", [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, Terminated)])
def test_a_signal_while_importing_is_raised_once_the_imports_are_done(signum, raised):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    finished = []
    with pytest.raises(raised):
        with signals_after_imports():
            os.kill(os.getpid(), signum)
            for _ in range(10_000):  # a Python handler that raised would raise in this loop
                pass
            finished.append(True)
    assert finished == [True]
    assert {s: signal.getsignal(s) for s in before} == before


def test_without_a_signal_nothing_is_raised_and_the_handlers_are_restored():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with signals_after_imports():
        pass
    assert {s: signal.getsignal(s) for s in before} == before
