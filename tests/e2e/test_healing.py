"""Self-healing runs, for real: a worker killed or hung mid-epoch, the job restarts itself from its last checkpoint
(`edsr-dist launch --max-restarts`, two launchers of a 2-server table, torchrun --max-restarts) and ends with the
weights of an uninterrupted run; what is not retried; the restart budget; continuing on fewer devices.

Every run is the TINY model for 20 steps on CPU (fp32) with a checkpoint every 4 steps; each test is bounded by
subprocess timeouts and leaves no process behind. `pytest -s` prints the measured time from a kill to training
again and the steps lost.
"""

from __future__ import annotations

import json
import re
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import TINY, Job, free_port, max_relative_difference, v1, write_table

STEPS = 20
TRAIN = [*TINY, "--steps-per-epoch", str(STEPS), "--save-every-steps", "4", "--log-every", "1"]
HEAL = ["--max-restarts", "2", "--restart-delay", "0.2"]
TIMEOUT_S = 150


def final_weights(out: Path) -> dict:
    from edsr_dist.state.checkpoint import load_checkpoint
    state = load_checkpoint(out / "checkpoints" / f"step_{STEPS:08d}.ckpt")
    assert state["step"] == STEPS
    return state["model"]


def _train_two_workers(sample_store: Path, folder: Path) -> None:
    job = Job([], [*TRAIN, "--data", str(sample_store), "--out", str(folder / "run")], folder)
    assert job.wait(timeout=TIMEOUT_S) == 0, job.stderr


@pytest.fixture(scope="session")
def reference(build_once, sample_store) -> dict:
    """The weights of an uninterrupted 2-worker run (built once per test run, see conftest.build_once)."""
    return final_weights(build_once("healing-reference", lambda folder: _train_two_workers(sample_store, folder))
                         / "run")


def kill_mid_epoch(job: Job, rank: int, at_step: int, sig=signal.SIGKILL) -> tuple[float, int]:
    """Send `sig` to `rank` once step `at_step` is logged; returns (when, the last step logged before it)."""
    job.wait_for_line(rf"Step nr: \[{at_step}/")
    victim = job.workers()[rank]
    sent = time.monotonic()
    victim.send_signal(sig)
    return sent, at_step


def wait_for_training_again(job: Job) -> tuple[float, int, int]:
    """After a fault: (when the first step of the restarted group was logged, the step it resumed from, that step)."""
    banner = job.wait_for_line(r"(resumed from .* at step \d+|fresh start)$", timeout=TIMEOUT_S)
    resumed = int(re.search(r"at step (\d+)$", banner).group(1)) if "resumed" in banner else 0
    first = job.wait_for_line(r"Step nr: \[\d+/", timeout=TIMEOUT_S)
    return time.monotonic(), resumed, int(re.search(r"\[(\d+)/", first).group(1))


def assert_resumed_from_a_save_after_the_fault_step(resumed: int, first: int, fault_step: int) -> None:
    """The fault is sent once step `fault_step` is logged; on a loaded machine the group may have trained and saved a
    few steps more before the signal lands. What must hold: the restart continues from a checkpoint of the cadence
    (every 4 steps) written no earlier than the last one before the fault, at the step after it."""
    assert resumed % 4 == 0 and resumed >= fault_step // 4 * 4, resumed
    assert first == resumed + 1, (resumed, first)


def assert_identical(weights: dict, reference: dict) -> None:
    assert weights.keys() == reference.keys()
    different = [k for k in weights if not torch.equal(weights[k], reference[k])]
    assert not different, f"weights differ from the uninterrupted run: {different}"


def test_killed_worker_restarts_and_ends_with_identical_weights(tmp_path, sample_store, reference):
    out = tmp_path / "run"
    job = Job(HEAL, [*TRAIN, "--data", str(sample_store), "--out", str(out)], tmp_path)
    try:
        killed_at, last_step = kill_mid_epoch(job, rank=1, at_step=9)
        training_at, resumed, first = wait_for_training_again(job)
        code = job.wait(timeout=TIMEOUT_S)
    finally:
        job.kill_leftovers()
    print(f"\nkill -9 of rank 1 at step {last_step} -> training again (step {first} logged): "
          f"{training_at - killed_at:.2f} s; resumed from step {resumed}: {last_step - resumed} step(s) lost")
    assert code == 0, job.stderr
    assert_resumed_from_a_save_after_the_fault_step(resumed, first, fault_step=9)  # nothing skipped
    lines = job.stderr.strip().splitlines()
    restart = [line for line in lines if "restart 1 of 2" in line]
    assert restart == [f"edsr-dist launch: rank 1 (device 1) was killed by signal SIGKILL; see "
                       f"{out / 'logs' / 'rank_1.log'}; restart 1 of 2 in 0.2 s, from step {resumed} "
                       f"({out / 'checkpoints' / f'step_{resumed:08d}.ckpt'})"]
    assert lines[-1] == "edsr-dist launch: finished after 1 restart"
    # The failed attempt's log is kept above the restart's.
    assert "==== edsr-dist launch: restart 1 ====" in (out / "logs" / "rank_1.log").read_text()
    assert_identical(final_weights(out), reference)
    job.assert_nothing_left()


def test_hung_worker_times_out_and_the_job_restarts(tmp_path, sample_store, reference):
    out = tmp_path / "run"
    job = Job(HEAL, [*TRAIN, "--data", str(sample_store), "--out", str(out), "--dist-timeout", "5"], tmp_path)
    try:
        stopped_at, _ = kill_mid_epoch(job, rank=1, at_step=9, sig=signal.SIGSTOP)
        training_at, resumed, first = wait_for_training_again(job)
        code = job.wait(timeout=TIMEOUT_S)
    finally:
        job.kill_leftovers()
    print(f"\nSIGSTOP of rank 1 -> training again: {training_at - stopped_at:.2f} s (--dist-timeout 5)")
    assert code == 0, job.stderr
    restart = [line for line in job.stderr.splitlines() if "restart 1 of 2" in line]
    assert len(restart) == 1 and "rank 1 (device 1, process stopped) stopped responding" in restart[0], job.stderr
    assert_resumed_from_a_save_after_the_fault_step(resumed, first, fault_step=9)
    assert_identical(final_weights(out), reference)
    job.assert_nothing_left()


def test_fewer_devices_continue_on_the_same_trajectory(tmp_path, sample_store, reference):
    """Device 1 fails, and fails again after the restart: the job goes on without it on one worker with the same
    global batch (--min-nproc 1) and ends within 1e-4 of the 2-worker run."""
    out = tmp_path / "run"
    job = Job([*HEAL, "--min-nproc", "1"], [*TRAIN, "--data", str(sample_store), "--out", str(out)], tmp_path)
    try:
        kill_mid_epoch(job, rank=1, at_step=5)
        _, first_resume, _ = wait_for_training_again(job)
        job.workers()[1].send_signal(signal.SIGKILL)  # at once: the restarted group may be near its end on a busy host
        banner = job.wait_for_line(r" 1 worker\(s\) via .*resumed from", timeout=TIMEOUT_S)
        code = job.wait(timeout=TIMEOUT_S)
    finally:
        job.kill_leftovers()
    assert code == 0, job.stderr
    second = [line for line in job.stderr.splitlines() if "restart 2 of 2" in line]
    resumed = int(re.search(r"at step (\d+)$", banner).group(1))
    assert resumed % 4 == 0 and resumed >= first_resume, (first_resume, resumed)  # no older than the last restart's
    assert len(second) == 1 and second[0].endswith(
        f"from step {resumed} (" + str(out / "checkpoints" / f"step_{resumed:08d}.ckpt") + "); device 1 failed twice "
        "in a row: "
        "continuing without it on 1 worker (global batch 4, 4 each)"), job.stderr
    assert max_relative_difference(reference, final_weights(out)) < 1e-4
    job.assert_nothing_left()


def test_four_devices_lose_one_and_continue_on_three_with_uneven_shares(tmp_path, sample_store):
    """--nproc 4 --min-nproc 3: device 3 fails twice, the job goes on with 3 workers whose shares of the global batch
    4 are 2/1/1, and ends as close to the uninterrupted 4-worker run as float rounding allows."""
    reference_out = tmp_path / "reference"
    reference_job = Job([], [*TRAIN, "--data", str(sample_store), "--out", str(reference_out)], tmp_path, nproc=4)
    assert reference_job.wait(timeout=TIMEOUT_S) == 0, reference_job.stderr
    out = tmp_path / "run"
    job = Job([*HEAL, "--min-nproc", "3"], [*TRAIN, "--data", str(sample_store), "--out", str(out)], tmp_path,
              nproc=4)
    try:
        kill_mid_epoch(job, rank=3, at_step=5)
        _, first_resume, _ = wait_for_training_again(job)
        job.workers()[3].send_signal(signal.SIGKILL)  # at once: the restarted group may be near its end on a busy host
        banner = job.wait_for_line(r" 3 worker\(s\) via .*resumed from", timeout=TIMEOUT_S)
        code = job.wait(timeout=TIMEOUT_S)
    finally:
        job.kill_leftovers()
    assert code == 0, job.stderr
    second = [line for line in job.stderr.splitlines() if "restart 2 of 2" in line]
    assert len(second) == 1 and second[0].endswith(
        "device 3 failed twice in a row: continuing without it on 3 workers (global batch 4, 2/1/1)"), job.stderr
    second_resume = int(re.search(r"at step (\d+)$", banner).group(1))
    assert second_resume % 4 == 0 and second_resume >= first_resume, (first_resume, second_resume)
    assert max_relative_difference(final_weights(reference_out), final_weights(out)) < 5e-5
    job.assert_nothing_left()


@pytest.mark.parametrize("fault", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "hung"])
def test_two_launchers_both_restart_after_a_worker_of_server_1_fails(tmp_path, sample_store, reference, fault):
    """A 2-server table on loopback addresses, one launcher per server (--server-index 0/1), one worker each.
    Killed: launcher 1 sees its worker die, launcher 0 sees its worker lose the connection (exit 4). Hung: only
    server 0's worker notices (a collective timeout); launcher 1 learns it from the launchers' store. Either way both
    restart once, meet again, and end with the uninterrupted run's weights."""
    out = tmp_path / "run"
    table = write_table(tmp_path, v1([("127.0.0.1", [0]), ("127.0.0.2", [0])]))
    port = str(free_port(span=2))  # the launchers' job store listens on port + 1
    # --dist-timeout also bounds the restarted ranks' meeting: server 1 restarts its worker about 2 s after server 0
    # (its hung worker gets FAILURE_GRACE_S before SIGKILL) and then imports torch, slow on a loaded CI runner; 5 s
    # was too short there once in about ten runs.
    train = [*TRAIN, "--data", str(sample_store), "--out", str(out), "--dist-timeout", "12"]
    servers = [Job(["--rank-table", str(table), "--server-index", str(i), "--master-port", port, *HEAL], train,
                   tmp_path, nproc=None) for i in range(2)]
    try:
        servers[0].wait_for_line(r"Step nr: \[9/")
        victim = servers[1].workers()[1]
        servers[0].workers()
        victim.send_signal(fault)
        codes = [job.wait(timeout=TIMEOUT_S) for job in servers]
    finally:
        for job in servers:
            job.kill_leftovers()
    assert codes == [0, 0], [job.stderr for job in servers]
    restarts = [[line for line in job.stderr.splitlines() if " restart " in line] for job in servers]
    assert [len(lines) for lines in restarts] == [1, 1], restarts
    from_steps = {int(m.group(1)) for lines in restarts for m in [re.search(r"restart 1 of 2 in 0\.2 s, from step (\d+) \(",
                                                                                lines[0])] if m}
    assert len(from_steps) == 1, restarts  # both servers restart from the same checkpoint
    resumed = from_steps.pop()
    assert_resumed_from_a_save_after_the_fault_step(resumed, resumed + 1, fault_step=9)
    if fault == signal.SIGKILL:
        assert "rank 1 (device 0) was killed by signal SIGKILL" in restarts[1][0]
    else:  # launcher 1 restarted on launcher 0's word
        assert restarts[1][0].startswith("edsr-dist launch: server 0: rank 0 (device 0) exited with code 4"), restarts
    assert all(job.stderr.strip().splitlines()[-1] == "edsr-dist launch: finished after 1 restart" for job in servers)
    assert not [job.stderr for job in servers if "Traceback" in job.stderr or "TCPStore" in job.stderr]
    assert_identical(final_weights(out), reference)
    for job in servers:
        job.assert_nothing_left()


def test_torchrun_max_restarts_heals_with_resume_auto(tmp_path, sample_store, reference):
    """torchrun restarts the workers; `--resume auto` makes each start continue from the newest checkpoint (the
    first one, with none yet, starts fresh)."""
    out = tmp_path / "run"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "--max-restarts", "1", "-m", "edsr_dist", "train"]
    job = Job([], [*TRAIN, "--data", str(sample_store), "--out", str(out), "--resume", "auto"], tmp_path,
              command=torchrun)
    try:
        job.wait_for_line(r"fresh start$")
        kill_mid_epoch(job, rank=1, at_step=9)
        _, resumed, first = wait_for_training_again(job)
        code = job.wait(timeout=TIMEOUT_S)
    finally:
        job.kill_leftovers()
    assert code == 0, job.stderr
    assert_resumed_from_a_save_after_the_fault_step(resumed, first, fault_step=9)
    assert_identical(final_weights(out), reference)
    job.assert_nothing_left()


# ---- with --exec workers: the launcher's decisions alone, no torch in the workers


def exec_job(tmp_path: Path, launch_args: list[str], script: str) -> Job:
    """One worker (or a rank table's) running `script`, which gets the path of a file to append to."""
    (tmp_path / "worker.py").write_text(script)
    nproc = None if "--rank-table" in launch_args else 1
    return Job(["--log-dir", str(tmp_path / "logs"), *launch_args, "--exec"],
               [sys.executable, str(tmp_path / "worker.py"), str(tmp_path / "starts.txt")], tmp_path, nproc=nproc)


RECORD_START = "import os, sys\nopen(sys.argv[1], 'a').write(os.environ['EDSR_DIST_RESTART'] + '\\n')\n"


@pytest.mark.parametrize("code, why", [(2, "a user error repeats on every restart"),
                                       (3, "a diverged run diverges again from the same checkpoint")])
def test_user_errors_and_divergence_are_not_retried(tmp_path, code, why):
    job = exec_job(tmp_path, ["--max-restarts", "3"], RECORD_START + f"sys.exit({code})\n")
    assert job.wait(timeout=60) == code
    assert (tmp_path / "starts.txt").read_text() == "0\n"
    assert job.last_stderr_line() == (f"edsr-dist launch: rank 0 (device 0) exited with code {code}; see "
                                      f"{tmp_path / 'logs' / 'rank_0.log'}; not restarted: {why}")


def test_restart_budget_exhausted_ends_with_one_line(tmp_path):
    job = exec_job(tmp_path, ["--max-restarts", "2", "--restart-delay", "0.1"],
                   RECORD_START + "os.kill(os.getpid(), 9)\n")
    started = time.monotonic()
    assert job.wait(timeout=60) == 128 + signal.SIGKILL
    elapsed = time.monotonic() - started
    assert (tmp_path / "starts.txt").read_text() == "0\n1\n2\n"  # the first start and two restarts
    lines = job.stderr.strip().splitlines()
    log = tmp_path / "logs" / "rank_0.log"
    assert [line for line in lines if " restart " in line] == [
        f"edsr-dist launch: rank 0 (device 0) was killed by signal SIGKILL; see {log}; restart 1 of 2 in 0.1 s, "
        "same command",
        f"edsr-dist launch: rank 0 (device 0) was killed by signal SIGKILL; see {log}; restart 2 of 2 in 0.2 s, "
        "same command"]
    assert lines[-1] == (f"edsr-dist launch: rank 0 (device 0) was killed by signal SIGKILL; see {log}; gave up "
                         "after 2 restarts (--max-restarts 2)")
    assert elapsed >= 0.3  # the back-off: 0.1 s, then 0.2 s


def test_restart_flags_are_checked(tmp_path):
    from helpers import run_cli
    for flags, message in ((["--max-restarts", "-1"], "--max-restarts -1: must be 0 or more"),
                           (["--min-nproc", "1"], "--min-nproc only acts when a restart happens"),
                           (["--hostfile", "h", "--max-restarts", "1"], "--max-restarts not used with --hostfile")):
        result = run_cli(["launch", *flags, "--", "--epochs", "1"], cwd=tmp_path, timeout=60)
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_save_every_minutes_checkpoints_on_rank_0s_clock(tmp_path, sample_store):
    """A cadence far shorter than a step: every step is due, whatever --save-every-steps says (off here)."""
    from helpers import run_cli
    out = tmp_path / "run"
    train = [*TINY, "--steps-per-epoch", "6", "--save-every-minutes", "1e-6", "--keep-last", "10"]
    result = run_cli(["train", *train, "--data", str(sample_store), "--out", str(out)], cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    # Rank 0's request of step k travels with step k's flags, which every rank reads during step k+1 (no host wait
    # in a step): the first save is after step 2, then one after every step.
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*.ckpt")) == [
        f"step_{step:08d}.ckpt" for step in range(2, 7)]


def test_min_nproc_with_a_rank_table_writes_the_reduced_table(tmp_path):
    """Device 1 of a single-server table dies at every start: after its second failure the launcher goes on with
    device 0 alone, as rank 0 of 1, and hands the workers the table of what is left."""
    table = write_table(tmp_path, v1([("127.0.0.1", [0, 1])]))
    script = RECORD_START + ("import json\nif os.environ['DEVICE_ID'] == '1': os.kill(os.getpid(), 9)\n"
                             "names = ('RANK', 'WORLD_SIZE', 'RANK_TABLE_FILE')\n"
                             "print(json.dumps({k: os.environ[k] for k in names}))\n")
    job = exec_job(tmp_path, ["--rank-table", str(table), "--max-restarts", "3", "--restart-delay", "0.1",
                              "--min-nproc", "1"], script)
    assert job.wait(timeout=60) == 0, job.stderr
    reduced = tmp_path / "logs" / "rank_table_1p.json"
    second = [line for line in job.stderr.splitlines() if "restart 2 of 3" in line]
    assert len(second) == 1 and second[0].endswith("; device 1 failed twice in a row: continuing without it on "
                                                   "1 worker"), job.stderr
    assert json.loads(reduced.read_text())["server_list"] == [
        {"server_id": "127.0.0.1", "device": [{"device_id": "0", "device_ip": "192.168.100.101", "rank_id": "0"}]}]
    last = json.loads((tmp_path / "logs" / "rank_0.log").read_text().strip().splitlines()[-1])
    assert last == {"RANK": "0", "WORLD_SIZE": "1", "RANK_TABLE_FILE": str(reduced)}


def test_a_user_error_on_one_server_ends_the_other_server_too(tmp_path):
    """Server 1's worker fails with exit 2 (never retried); server 0's worker is healthy and would wait for it
    forever: its launcher learns from the launchers' store that the job ended, stops it and says where it ended."""
    table = write_table(tmp_path, v1([("127.0.0.1", [0]), ("127.0.0.2", [0])]))
    (tmp_path / "worker.py").write_text("import os, sys, time\nif os.environ['RANK'] == '1': sys.exit(2)\n"
                                        "time.sleep(60)\n")
    port = str(free_port(span=2))  # the launchers' job store listens on port + 1
    servers = [Job(["--rank-table", str(table), "--server-index", str(i), "--master-port", port, "--log-dir",
                    str(tmp_path / "logs"), *HEAL, "--exec"], [sys.executable, str(tmp_path / "worker.py")], tmp_path,
                   nproc=None) for i in range(2)]
    try:
        codes = [job.wait(timeout=60) for job in servers]
    finally:
        for job in servers:
            job.kill_leftovers()
    log = tmp_path / "logs" / "rank_1.log"
    ended = f"rank 1 (device 0) exited with code 2; see {log}"
    assert codes == [4, 2], [job.stderr for job in servers]
    assert servers[1].last_stderr_line() == (f"edsr-dist launch: {ended}; not restarted: a user error repeats on "
                                             "every restart")
    assert servers[0].last_stderr_line() == (f"edsr-dist launch: stopped 1 worker(s); the job ended on server 1: "
                                             f"{ended}")
