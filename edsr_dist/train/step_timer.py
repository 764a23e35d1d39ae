"""The measuring seam of the training loop (see StepTimer)."""

from __future__ import annotations

import contextlib


class StepTimer:
    """The measuring seam: the trainer marks each step and its named phases here, and this default records
    nothing. `edsr-dist bench` and tests pass a subclass that does.

    Phases, in the order a step meets them: data_wait (the loop waiting for the prefetch thread, between
    steps), to_device (once per micro-batch, before its forward: --accumulate N repeats it N times, so its
    k-th entry follows the backward of micro-batch k-1), finish_gradients (starts as soon as the last backward
    returns), overflow_check (the all-reduce of the overflow and stop flags), optimizer.
    """

    def begin_step(self) -> None:
        pass

    def end_step(self, skipped: bool) -> None:
        pass

    def phase(self, name: str) -> contextlib.AbstractContextManager:
        return _NO_PHASE


_NO_PHASE = contextlib.nullcontext()
