"""Two torchrun agents on 127.0.0.1 (`--nnodes 2`, c10d rendezvous): one node's worker hangs while the other's is
killed. The hung node's agent restarts for the membership change without counting it (torch elastic
agent/server/api.py _invoke_run), so the two nodes' workers get different TORCHELASTIC_RESTART_COUNTs; the job
must heal in that one restart (resume from the last checkpoint and finish), without a wasted attempt or a wait
until --dist-timeout."""

from __future__ import annotations

import re
import signal
import sys
import time

from helpers import TINY, Job, free_port

TIMEOUT_S = 90


def start_agent(port: int, train: list[str], cwd) -> Job:
    """A torchrun agent for one of two nodes; its log (stderr) is read with the workers' output."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "nodes",
               "--max-restarts", "1", "--monitor-interval", "0.1", "-m", "edsr_dist", "train"]
    return Job([], train, cwd, nproc=None, command=command, env={"LOGLEVEL": "INFO", "OMP_NUM_THREADS": "1"},
               merge_stderr=True)


def test_a_node_restarting_for_a_membership_change_rejoins_the_same_attempt(tmp_path, sample_store):
    out = tmp_path / "run"
    train = [*TINY, "--data", str(sample_store), "--out", str(out), "--resume", "auto", "--save-every-steps", "4",
             "--log-every", "1", "--dist-timeout", "30"]
    port = free_port()
    agents = [start_agent(port, train, tmp_path), start_agent(port, train, tmp_path)]
    try:
        first = {int(a.worker().environ()["RANK"]): a for a in agents}
        hung, killed = first[0], first[1]
        hung.wait_for_line(r"Step nr: \[9/", timeout=TIMEOUT_S)
        old_worker = hung.worker()
        stopped_at = time.monotonic()
        old_worker.send_signal(signal.SIGSTOP)
        killed.worker().send_signal(signal.SIGKILL)
        # The hung node's agent sees the other node waiting and restarts without counting a failure.
        hung.wait_for_line(r"Detected 1 new nodes", timeout=TIMEOUT_S)
        old_worker.send_signal(signal.SIGCONT)  # let it take the agent's SIGTERM
        codes = [a.wait(timeout=TIMEOUT_S) for a in agents]
        healed_in = time.monotonic() - stopped_at
    finally:
        for a in agents:
            a.kill_leftovers()
    console = "".join(agents[0].stdout + agents[1].stdout)
    assert codes == [0, 0], console[-4000:]
    counts = sorted(int(p.split("=")[1]) for p in re.findall(r"restart_count=\d+", console))
    # One rendezvous per agent for the start, one for the restart, with counts 0 and 1 for the restart. Before
    # the fix the rank with the old count found the previous attempt's keys (Gloo dialled dead peers; HCCL would
    # wait for a dead root-info host until HCCL_CONNECT_TIMEOUT) and a third attempt was needed.
    assert counts == [0, 0, 0, 1], f"expected the two restart counts to differ in one restart: {counts}"
    assert "could not join" not in console, console[-4000:]
    # The hung rank is stopped once step 9 is logged; under load the group may have saved step 12 first.
    resumed = [int(step) for step in re.findall(r"resumed from .* at step (\d+)$", console, re.M)]
    assert resumed and all(step in (8, 12) and step == resumed[0] for step in resumed), console[-4000:]
    assert len(re.findall(r"^Result: ", console, re.M)) == 1
    # Healed by the membership change, not by waiting out --dist-timeout: no collective timed out anywhere.
    assert "collective timed out" not in console, console[-4000:]
    for agent in agents:
        agent.assert_nothing_left()
    print(f"two-node torchrun healed in {healed_in:.1f} s")
