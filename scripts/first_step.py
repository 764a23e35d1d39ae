"""Seconds from starting a command to its first training step line (`Step nr: [1/...`), N times.

    python scripts/first_step.py [--repeat N] -- bash launch/run_1p.sh --preset sample --max-steps 2 --log-every 1 --out DIR

The output folder is removed before each start (a fresh run each time). Prints one line per start and the median.
"""

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time


def time_to_first_step(command: list[str]) -> float:
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               start_new_session=True)
    try:
        for line in process.stdout:
            if line.startswith("Step nr: [1/"):
                return time.perf_counter() - start
        raise SystemExit(f"first_step.py: {' '.join(command)} ended (code {process.wait()}) before a step line")
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the launcher and its workers
        process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    out = command[command.index("--out") + 1] if "--out" in command else None
    seconds = []
    for _ in range(args.repeat):
        if out:
            shutil.rmtree(out, ignore_errors=True)
        seconds.append(time_to_first_step(command))
        print(f"{seconds[-1]:.2f} s (load average {os.getloadavg()[0]:.2f})", flush=True)
    print(f"median {statistics.median(seconds):.2f} s of {len(seconds)}", file=sys.stdout)


if __name__ == "__main__":
    main()
