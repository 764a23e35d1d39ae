"""A single-server `edsr-dist launch` starts its worker without importing torch in its own process (issue 32: the
launcher's torch import delayed the demo's first step by about a second); the worker still imports it."""

from __future__ import annotations

import subprocess
import sys

from helpers import clean_env

# Runs the command as `edsr-dist` does, then says whether the launcher's process imported torch.
LAUNCHER = r'''
import sys
from edsr_dist.cli import main
code = main(sys.argv[1:])
print(f"launcher exit {code}, torch imported: {'torch' in sys.modules}", flush=True)
'''


def run_launcher(args: list[str], cwd, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", LAUNCHER, "launch", "--nproc", "1", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd, env=clean_env())


def test_an_exec_launch_never_imports_torch(tmp_path):
    worker = "import sys; print('worker ran, torch imported:', 'torch' in sys.modules)"
    result = run_launcher(["--exec", "--", sys.executable, "-c", worker], tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "worker ran, torch imported: False" in result.stdout
    assert "launcher exit 0, torch imported: False" in result.stdout


def test_a_training_launch_imports_torch_only_in_the_worker(tmp_path):
    # The launcher claims --out and looks for a checkpoint to name (supervise.py) before the worker starts.
    tiny = ["--preset", "sample", "--max-steps", "1", "--num-blocks", "1", "--num-filters", "4", "--log-every", "1",
            "--out", str(tmp_path / "run")]
    result = run_launcher(["--", *tiny], tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "Step nr: [1/1]" in result.stdout
    assert "launcher exit 0, torch imported: False" in result.stdout
    assert (tmp_path / "run" / "checkpoints" / "latest").is_file()
