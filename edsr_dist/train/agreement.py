"""What every rank must agree on after a step: was it finite, was a stop asked for, is a timed checkpoint due.

One small all-reduce per step carries the three flags; the host reads them a step later (see StepAgreement), so
no step waits for the device, and every rank reads them at the same steps, so every rank acts alike."""

from __future__ import annotations

import contextlib
import signal

import torch

# Consecutive steps with a non-finite loss or gradient before the run is declared diverged. fp16 needs
# more room: the loss scaler legitimately overflows a few times while it finds its scale.
MAX_BAD_STEPS = {"fp16": 30, "bf16": 5, "fp32": 5}


class TrainingDiverged(Exception):
    """Loss or gradients stayed NaN/inf beyond what loss scaling recovers from."""


class StepAgreement:
    """The flags of each step on their way to the host, and what the host has read from them so far.

    The flags of step k are read during step k+1 (or at once where a save or the epoch's end needs them), so the
    host never waits for the step it has just queued. A stop or timed save is therefore acted on one step after
    it was asked for, and divergence may be declared one step after its last bad step, on every rank alike."""

    def __init__(self, max_bad_steps: int):
        self.max_bad_steps = max_bad_steps
        self.pending: list[tuple[int, torch.Tensor | list, object]] = []  # (step, flags on the host, ready event)
        self.bad_steps = 0  # consecutive non-finite steps, as far as the host has read the flags
        self.stop_requested = False  # set by a signal, on this rank, at any moment
        self.stop_signal: int | None = None  # which signal, when this rank got one (for the exit code)
        self.stop_agreed = False  # set on every rank at the same step: the only one the loop acts on
        self.timed_save_agreed = False  # rank 0's "a timed checkpoint is due", as every rank received it

    def flags(self, bad: torch.Tensor, timed_save: bool) -> torch.Tensor:
        """This rank's flags for the all-reduce (max): non-finite step, stop asked for, timed save due.
        new_full fills on the device: torch.tensor(list, device=...) would be a blocking host-to-device copy."""
        return torch.stack([bad, bad.new_full((), float(self.stop_requested)), bad.new_full((), float(timed_save))])

    def post(self, step: int, flags: torch.Tensor, host_decides: bool) -> bool:
        """Queue the all-reduced flags of `step`. Where the host decides the skip it reads them now (on the CPU a
        read, not a wait) and gets whether the step is skipped; elsewhere they are copied without waiting and
        this returns False (the device decides)."""
        if host_decides:
            host = flags.tolist()
            self.pending.append((step, host, None))
            return host[0] > 0
        self.pending.append((step, *_copy_to_host(flags)))
        return False

    def read(self, through_step: int) -> None:
        """Act on the flags of every step up to `through_step` not read yet, oldest first: count non-finite steps
        (TrainingDiverged after max_bad_steps in a row), take up agreed stop and timed-save requests."""
        while self.pending and self.pending[0][0] <= through_step:
            step, host, ready = self.pending.pop(0)
            if ready is not None:
                ready.synchronize()
            bad, stop, timed_save = host.tolist() if torch.is_tensor(host) else host
            if stop > 0:
                self.stop_agreed = True
            if timed_save > 0:
                self.timed_save_agreed = True
            self.count_bad_step(bad > 0, step)

    def count_bad_step(self, bad: bool, step: int) -> None:
        self.bad_steps = self.bad_steps + 1 if bad else 0
        if self.bad_steps >= self.max_bad_steps:
            raise TrainingDiverged(step)

    def request_stop(self, signum, frame) -> None:
        self.stop_requested = True
        self.stop_signal = signum

    @contextlib.contextmanager
    def stop_on_signals(self):
        """SIGTERM/SIGINT only ask for a stop; the next step's all-reduce makes every rank agree on it."""
        previous = {sig: signal.signal(sig, self.request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _copy_to_host(flags: torch.Tensor) -> tuple[torch.Tensor, object]:
    """Start copying the flags to the host without waiting; an event tells when they have arrived. The host
    buffer is page-locked: a copy into pageable memory would make the host wait."""
    if flags.device.type == "cuda":
        host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
        host.copy_(flags, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return host, ready
    return flags.to("cpu", non_blocking=True), None
