"""How the launchers of a multi-server job agree on restarts: a small TCPStore held by the first server's launcher."""

from __future__ import annotations

import time
from datetime import timedelta

from edsr_dist.errors import UserError
from edsr_dist.launcher.plan import POLL_S

JOB_STORE_TIMEOUT_S = 300.0  # how long a launcher waits for the first server's launcher (it may start later)


class JobStore:
    """How the launchers of a multi-server job agree on restarts. The first server's launcher holds a small
    key-value store (torch's TCPStore) on the master port + 1. The job's generation (0 for the first start, then the
    restart number, or "end") lives there: the launcher that sees a failure first moves it on, and every other
    launcher that sees it move stops its workers and follows, also one whose workers are all hung and which would
    otherwise see nothing. So every server restarts as often, and at the same time, as the others."""

    KEY = "edsr-dist/generation"
    CHECK_S = 0.5  # how often a running attempt asks whether another server moved the job on

    DONE = "edsr-dist/launchers-done"
    CLOSE_WAIT_S = 10.0  # the first launcher keeps the store up this long for the others to finish reading it

    def __init__(self, addr: str, port: int, first: bool, server_index: int, servers: int):
        # Imported here: only a multi-server launch with restarts opens a store; a single-server launcher runs
        # without importing torch (about a second of its start-up).
        from torch.distributed import TCPStore

        try:
            self.store = TCPStore(addr, port, is_master=first, wait_for_workers=False,
                                  timeout=timedelta(seconds=JOB_STORE_TIMEOUT_S))
            if first:
                self.store.set(self.KEY, "0")
            self.seen = self.store.get(self.KEY).decode()
        except (RuntimeError, OSError) as exc:
            raise UserError(f"launchers cannot meet at {addr}:{port} ({str(exc).splitlines()[0]}); with "
                            "--max-restarts the first server's launcher listens there (master port + 1): open it "
                            "between the servers") from None
        self.server_index = server_index
        self.servers = servers
        self.first = first
        self.reachable = True
        self._next_check = 0.0
        self._latest = self.seen

    def news(self) -> str:
        """While workers run: "" or the line of the launcher that restarted or ended the job elsewhere."""
        if not self.reachable or time.monotonic() < self._next_check:
            return ""
        self._next_check = time.monotonic() + self.CHECK_S
        try:
            now = self.store.get(self.KEY).decode()
        except (RuntimeError, OSError):
            # The first server's launcher is gone; its workers' fate reaches ours through the collectives. Asking
            # again would only repeat torch's warning.
            self.reachable = False
            return ""
        if now == self.seen:
            return ""
        self._latest = now
        return self.why(now)

    def follow(self) -> str:
        """After `news`: join the generation another launcher moved the job to."""
        self.seen = self._latest
        return self.generation()

    def generation(self) -> str:
        """The restart number the job is in ("0" at first), or "end"."""
        return self.seen.split("@", 1)[0]

    def why(self, value: str | None = None) -> str:
        """The line of the launcher that moved the job to `value` (default: where this launcher last saw it)."""
        try:
            return self.store.get(f"{self.KEY}/{value or self.seen}").decode()
        except (RuntimeError, OSError):
            return "the first server (its launcher cannot be reached)"

    def close(self) -> None:
        """The others say they are done; the first launcher waits for them (briefly) before its store goes away."""
        try:
            if not self.first:
                if self.reachable:
                    self.store.add(self.DONE, 1)
                return
            deadline = time.monotonic() + self.CLOSE_WAIT_S
            while self.store.add(self.DONE, 0) < self.servers - 1 and time.monotonic() < deadline:
                time.sleep(POLL_S)
        except (RuntimeError, OSError):
            pass

    def move_on(self, line: str, end: bool = False) -> str:
        """After a failure seen here: the generation the job is in now ("end" when it ended). The first launcher
        to ask moves it on (and tells the others why); the others learn where it went. A value names its mover
        (`<generation>@<server>`), so a launcher knows whether the move was its own."""
        if self.generation() == "end":
            return "end"
        target = f"{'end' if end else int(self.generation()) + 1}@{self.server_index}"
        try:
            now = self.store.compare_set(self.KEY, self.seen, target).decode()
            if now == target:
                self.store.set(f"{self.KEY}/{target}", f"server {self.server_index}: {line}")
        except (RuntimeError, OSError):
            now = "end"  # nobody to restart with
        self.seen = now
        return self.generation()
