"""Training batches read ahead in a background thread."""

from __future__ import annotations

import queue
import threading

import torch

from edsr_dist.train.step_timer import StepTimer


def page_locked(batch):
    """The batch's arrays as tensors in page-locked host memory, so that the step's non_blocking copy to the device
    is asynchronous. From pageable memory torch_npu turns it into a stream synchronisation ("Sync when host memory
    is allocated by malloc", torch_npu/csrc/core/npu/CachingHostAllocator.cpp:1404-1419) and CUDA stages it with a
    stream sync. `pin_memory()` without a device pins for the current accelerator (torch/_tensor_docs.py, 2.13),
    as torch_npu's own code does (torch_npu/npu/amp/grad_scaler.py:463). Each batch gets a fresh block from the
    host caching allocator, which reuses a block only after the copies recorded on it are done."""
    return tuple(torch.from_numpy(array).pin_memory() for array in batch)


class Prefetcher:
    """Reads the next batches in a background thread so the step never waits on HDF5 and augmentation."""

    def __init__(self, produce, steps, timer: StepTimer, depth: int = 3, pin: bool = False):
        """pin: hand out batches in page-locked memory (see page_locked), for a CUDA or NPU device."""
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._timer = timer

        def run():
            try:
                for step in steps:
                    if self._stop.is_set():
                        return
                    batch = produce(step)
                    self._queue.put((step, page_locked(batch) if pin else batch, None))
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
