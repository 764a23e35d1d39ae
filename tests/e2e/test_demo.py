"""The README's promise: `bash launch/run_1p.sh` with no arguments trains the sample demo and beats bicubic by >= 1 dB."""

import os
import re
import subprocess
import sys

from helpers import REPO


def test_run_1p_with_no_arguments_is_the_cpu_demo(tmp_path):
    # On one core of the machine, as in a one-CPU container: the launcher binds its worker to the cores it is given
    # and runs one thread per core. Beside the suite's other workers, two OpenMP threads lose most of their time at
    # barriers whenever one is descheduled (on 2 cores: 257 CPU-seconds with two threads beside the suite; alone,
    # 86 s with two threads and 67 s with one).
    env = dict(os.environ, PYTHON=sys.executable, XDG_CACHE_HOME=str(tmp_path / "cache"))
    env.pop("EDSR_DIST_CACHE", None)
    one_core = {max(os.sched_getaffinity(0))}
    result = subprocess.run(["bash", str(REPO / "launch" / "run_1p.sh")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=1500,
                            preexec_fn=lambda: os.sched_setaffinity(0, one_core))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    last = result.stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"Result: EDSR (\d+\.\d+) dB, bicubic (\d+\.\d+) dB \(Y-PSNR, 3 held-out images\)", last)
    assert match, last
    edsr, bicubic = map(float, match.groups())
    assert edsr - bicubic >= 1.0, last
    out = tmp_path / "runs" / "sample"
    assert len(list((out / "samples").glob("*_bicubic_edsr_gt.png"))) == 3
    assert (out / "checkpoints" / "latest").exists() and (out / "logs" / "rank_0.log").exists()
    assert list((tmp_path / "cache" / "edsr-dist").glob("sample_*.h5"))  # built from scratch, in the cache
