"""`edsr-dist ARGS` with test-only pauses around checkpoint writes, so a test can act (SIGKILL the run, start a
second one, cut a server) at a known point; nothing in the trainer is told. The hooks wrap the real functions and
are installed before the CLI imports the trainer (which binds `save_checkpoint` by name). Chosen by variables:

  PAUSE_AFTER_SAVE_STEP=k  after rank 0 wrote the checkpoint of step k: wait until the file GO_FILE exists
                           (without GO_FILE: until the test kills the process).
  PAUSE_MID_WRITE_STEP=k   write half of step k's checkpoint under the temporary name the real writer uses, then
                           wait for the kill.
  PAUSE_STEPS=a,b PAUSE_DIR=d  after the bucket mirror queued step a's checkpoint (its upload thread goes on):
                           touch d/saved_a, then wait until d/go_a exists.
"""

import os
import sys
import time
from pathlib import Path

import edsr_dist.state.checkpoint as checkpoint
from edsr_dist.state.mirror import RunMirror


def wait_for(path: Path | None) -> None:
    while path is None or not path.exists():
        time.sleep(0.02)


def main() -> int:
    pause_after = int(os.environ.get("PAUSE_AFTER_SAVE_STEP", "0"))
    pause_mid_write = int(os.environ.get("PAUSE_MID_WRITE_STEP", "0"))
    go = Path(os.environ["GO_FILE"]) if os.environ.get("GO_FILE") else None
    mirror_steps = {int(s) for s in os.environ.get("PAUSE_STEPS", "").split(",") if s}
    mirror_dir = Path(os.environ.get("PAUSE_DIR", "."))
    real_save, real_write = checkpoint.save_checkpoint, checkpoint.atomic_write_bytes
    real_saved = RunMirror.checkpoint_saved

    def save(out_dir, state, step, keep_last, psnr=None):
        path = real_save(out_dir, state, step, keep_last, psnr)
        if step == pause_after:
            wait_for(go)
        return path

    def write(path, *parts):
        if path.name == f"step_{pause_mid_write:08d}.ckpt":
            data = b"".join(parts)
            with open(path.with_name(f".{path.name}.tmp-{os.getpid()}"), "wb") as f:
                f.write(data[: len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
            wait_for(None)
        real_write(path, *parts)

    def saved(self, step_file):
        real_saved(self, step_file)  # queued for upload: the upload thread goes on while we wait
        step = int(step_file.stem.split("_")[1])
        if step in mirror_steps:
            (mirror_dir / f"saved_{step}").touch()
            wait_for(mirror_dir / f"go_{step}")

    checkpoint.save_checkpoint, checkpoint.atomic_write_bytes, RunMirror.checkpoint_saved = save, write, saved
    from edsr_dist.cli import main as cli_main  # after the hooks: the trainer binds save_checkpoint when imported
    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
