"""The CLI's one-line errors: a bad flag, and no torch installed."""
import subprocess
import sys

from helpers import run_cli


def test_cli_bad_flag_exits_2_with_one_line(tmp_path):
    result = run_cli(["train", "--epochs", "zero"], cwd=tmp_path, timeout=60)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "epochs expects int" in result.stderr
    result = run_cli(["frobnicate"], cwd=tmp_path, timeout=60)
    assert result.returncode == 2 and "unknown command" in result.stderr


def test_missing_torch_is_a_one_line_error(tmp_path):
    # -S leaves out site-packages: the package is importable from the checkout, torch is not.
    from helpers import REPO

    result = subprocess.run([sys.executable, "-S", "-m", "edsr_dist", "train"], capture_output=True, text=True,
                            timeout=60, cwd=tmp_path, env={"PYTHONPATH": str(REPO)})
    assert result.returncode == 2
    assert result.stderr.strip() == ("edsr-dist: error: PyTorch is not installed; on CPU run `pip install -r "
                                     "requirements-cpu.txt`, on GPUs/NPUs install the torch build for your hardware first")
