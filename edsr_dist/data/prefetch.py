"""Training batches read ahead in a background thread."""

from __future__ import annotations

import queue
import threading

from edsr_dist.train.step_timer import StepTimer


class Prefetcher:
    """Reads the next batches in a background thread so the step never waits on HDF5 and augmentation."""

    def __init__(self, produce, steps, timer: StepTimer, depth: int = 3):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._timer = timer

        def run():
            try:
                for step in steps:
                    if self._stop.is_set():
                        return
                    self._queue.put((step, produce(step), None))
            except BaseException as exc:  # handed to the consumer, raised there
                self._queue.put((None, None, exc))
            self._queue.put((None, None, StopIteration()))

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def __iter__(self):
        while True:
            with self._timer.phase("data_wait"):
                step, batch, exc = self._queue.get()
            if isinstance(exc, StopIteration):
                return
            if exc is not None:
                raise exc
            yield step, batch

    def close(self):
        """Stop and join the reader: a thread left inside HDF5 at interpreter exit can abort the process."""
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread.join()
