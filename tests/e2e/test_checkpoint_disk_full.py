"""A checkpoint write that fails (file size limit) leaves the previous checkpoint usable."""

import os
import resource
import signal
import subprocess
import sys
import textwrap

import torch
from helpers import REPO

from edsr_dist.state.checkpoint import find_checkpoint, save_checkpoint


def _limit_file_size():
    # Python itself ignores SIGXFSZ, so writes past the limit fail with EFBIG instead of killing the process.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))


def test_failed_write_keeps_old_checkpoint(tmp_path):
    old = save_checkpoint(tmp_path, {"model": {"w": torch.arange(16.0)}, "step": 1}, step=1, keep_last=1, psnr=30.0)
    old_bytes = old.read_bytes()
    script = textwrap.dedent(f"""
        import sys, torch
        from edsr_dist.state.checkpoint import save_checkpoint
        from edsr_dist.errors import UserError
        try:
            state = {{"model": {{"w": torch.zeros(1_000_000)}}}}
            save_checkpoint({str(tmp_path)!r}, state, step=2, keep_last=1, psnr=99.0)
        except UserError as exc:
            print("USERERROR", exc)
            sys.exit(3)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), preexec_fn=_limit_file_size, timeout=120)
    assert proc.returncode == 3, proc.stderr
    message = proc.stdout
    assert "USERERROR" in message and str(tmp_path / "checkpoints") in message
    assert "ulimit" in message and "intact" in message
    folder = tmp_path / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["best", "index.json", "latest", "step_00000001.ckpt"]
    assert old.read_bytes() == old_bytes
    assert (folder / "latest").read_text().strip() == old.name
    assert find_checkpoint(tmp_path) == old
