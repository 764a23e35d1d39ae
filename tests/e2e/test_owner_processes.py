"""The owner record of a run folder (state/owner.py) against other real processes: exclusive create racing between
processes, a live owner on this machine refused, a gone pid taken over."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest
from helpers import REPO, owner_record, write_owner

from edsr_dist.errors import UserError
from edsr_dist.state import owner as owner_mod
from edsr_dist.state.owner import LocalLock, claim, owner_gone, read_owner

CREATE_AT = """
import sys, time
from edsr_dist.state.owner import LocalLock
folder, start = sys.argv[1], float(sys.argv[2])
while time.time() < start:
    pass
print(LocalLock(folder).create(b"x") is not None)
"""


def test_exclusive_create_has_one_winner_among_processes(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for trial in range(3):
        folder = tmp_path / f"run{trial}"
        start = time.time() + 1.0  # the interpreters are up by then and create at the same instant
        procs = [subprocess.Popen([sys.executable, "-c", CREATE_AT, str(folder), str(start)], env=env,
                                  stdout=subprocess.PIPE, text=True) for _ in range(6)]
        wins = [p.communicate(timeout=30)[0].strip() for p in procs]
        assert wins.count("True") == 1 and wins.count("False") == 5, wins



def test_a_live_owner_on_this_machine_is_refused_in_one_line(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        other = owner_record(pid=sleeper.pid, pid_started=owner_mod.process_start_time(sleeper.pid), job="J7")
        write_owner(tmp_path / "run", other)
        assert owner_gone(other) is None
        with pytest.raises(UserError) as caught:
            claim(LocalLock(tmp_path / "run"), "run")
        message = str(caught.value)
        assert re.fullmatch(rf"--out run is in use by job J7 on host {re.escape(other.host)} \(pid {sleeper.pid}, "
                            r"started .+, last seen \d+ s ago\); wait for it to end, stop it, or use another --out "
                            r"\(--take-over if you know it is dead\)", message), message
        assert read_owner(LocalLock(tmp_path / "run")) == other  # untouched
    finally:
        sleeper.kill()
        sleeper.wait()



def test_a_gone_pid_is_taken_over_with_a_note(tmp_path, capsys):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = owner_record(pid=int(finished.stdout), pid_started=time.time() - 5)
    write_owner(tmp_path / "run", dead)
    assert owner_gone(dead) == f"its pid {dead.pid} is gone"
    held = claim(LocalLock(tmp_path / "run"), "run")
    assert read_owner(held.lock).token == held.token != dead.token
    err = capsys.readouterr().err
    assert err.startswith(f"edsr-dist: took over --out run from job {dead.job} on host {dead.host} (pid {dead.pid}")
    assert err.rstrip().endswith(f"its pid {dead.pid} is gone")
    held.release()
