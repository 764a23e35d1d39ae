"""Runs `edsr-dist sr` twice in one process: once on a small image with the same options (so every import, thread
and allocator arena exists), then, with the address space limited (RLIMIT_AS, as `ulimit -v` does) to what it
uses now plus <budget MiB>, on the real inputs. Exits with sr's exit status.

usage: sr_under_limit.py <budget MiB> <warm-up image> <sr arguments...>
"""

import resource
import sys
import tempfile

import psutil

from edsr_dist.cli import main

budget, warm_up, argv = int(sys.argv[1]) * 2 ** 20, sys.argv[2], sys.argv[3:]
checkpoint = argv[argv.index("--checkpoint") + 1]
with tempfile.TemporaryDirectory() as out:
    if main(["sr", "--checkpoint", checkpoint, warm_up, "--out", out, *argv[argv.index("--out") + 2:]]) != 0:
        sys.exit("the warm-up run failed")
limit = psutil.Process().memory_info().vms + budget
resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
sys.exit(main(["sr"] + argv))
