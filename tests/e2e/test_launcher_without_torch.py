"""A single-server `edsr-dist launch` starts its worker without importing torch in its own process (issue 32: the
launcher's torch import delayed the demo's first step by about a second); the worker still imports it."""

from __future__ import annotations

import subprocess
import sys

from helpers import clean_env, fake_npu_env

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


def test_where_a_device_extension_can_break_import_torch_launch_still_says_so_in_one_line(tmp_path):
    """A torch.backends entry point (torch_npu's) runs inside `import torch`: there the launcher still checks the
    import itself, before it claims --out or starts a worker."""
    env = fake_npu_env(FAKE_NPU_BROKEN_CANN="1", TMPDIR=str(tmp_path))
    for name in ("MASTER_ADDR", "MASTER_PORT", "JOB_ID", "OMP_NUM_THREADS"):
        env.pop(name, None)
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "edsr_dist", "launch", "--nproc", "1", "--", "--preset", "sample",
                             "--device", "cpu", "--out", str(out)], env=env, cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("edsr-dist launch: error: `import torch` failed because it auto-loads torch_npu")
    assert not out.exists()
