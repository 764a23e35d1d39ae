"""`edsr-dist <command>`: one entry point; each command lives in its own module and is imported on use."""

from __future__ import annotations

import contextlib
import errno
import importlib
import importlib.util
import os
import re
import signal
import sys
import threading
from importlib.metadata import entry_points

from edsr_dist import __version__
from edsr_dist.errors import Terminated, UserError, did_you_mean

# command -> (module, function taking argv and returning an exit code, one-line help)
COMMANDS = {
    "train": ("edsr_dist.train.command", "main", "train EDSR (one worker; started directly, by the launcher, torchrun, horovodrun or mpirun)"),
    "launch": ("edsr_dist.launcher.command", "main", "start and supervise one worker per device (rank table, --nproc, hostfile)"),
    "rank-table": ("edsr_dist.launcher.table_command", "main", "check or make an Ascend HCCL rank table"),
    "world": ("edsr_dist.launcher.world_command", "main", "print what a worker started in this environment would be (rank, size, device)"),
    "build-store": ("edsr_dist.data.build_store", "main", "build an HDF5 patch store from DIV2K-style folders or the embedded sample"),
    "eval": ("edsr_dist.evaluation.command", "main", "evaluate checkpoints on a store or a folder of HR images"),
    "sr": ("edsr_dist.inference.command", "main", "super-resolve images with a checkpoint or an .onnx model (tiled, optional self-ensemble)"),
    "export": ("edsr_dist.inference.export", "main", "export a model: weights (safetensors, reference/BasicSR names) or verified ONNX"),
    "bench": ("edsr_dist.perf.train_speed", "main", "measure training throughput, overheads and scaling"),
    "runs": ("edsr_dist.state.runs_command", "main", "show who writes into a run folder (owner, heartbeat age) and its newest checkpoint"),
    "bench-sr": ("edsr_dist.perf.sr_speed", "main", "measure inference speed: PyTorch and ONNX Runtime on the same images"),
}
# Commands usable without torch: rank-table and world only read text files and the environment; sr checks for torch
# itself, since `sr --backend onnxruntime` serves an exported model without it.
WITHOUT_TORCH = {"rank-table", "world", "sr"}
# launch needs torch in its workers, not in its own process (a single-server launch starts them about a second
# sooner): it imports torch only to check that it imports, where a device extension can break that import.
TORCH_IN_WORKERS = {"launch"}


def usage() -> str:
    lines = ["usage: edsr-dist <command> [options]   (edsr-dist --version)", "", "commands:"]
    lines += [f"  {name:<12} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "`edsr-dist <command> --help` for the options of one command."]
    return "\n".join(lines)


def torch_import_problem() -> str | None:
    """`import torch` runs every `torch.backends` entry point (torch/__init__.py _import_device_backends); torch_npu
    registers one (its setup.py), so a broken CANN install makes `import torch` itself raise, in every command. One
    line naming the cause and both fixes instead of a traceback; None when torch imports."""
    try:
        importlib.import_module("torch")
    except RuntimeError as exc:
        if "Failed to load the backend extension" not in str(exc):
            raise
        match = re.search(r"backend extension: ([^.\s]+)", str(exc))
        name = match.group(1) if match else "a device extension"
        cause = exc.__cause__
        detail = f"{type(cause).__name__}: {str(cause).strip().splitlines()[0]}" if cause is not None and str(cause).strip() else (
            type(cause).__name__ if cause is not None else "unknown error")
        return (f"`import torch` failed because it auto-loads {name} (a torch.backends entry point), which raised "
                f"{detail}; for NPU work source CANN's set_env.sh (/usr/local/Ascend/ascend-toolkit/set_env.sh), "
                "for CPU work set TORCH_DEVICE_BACKEND_AUTOLOAD=0")
    return None


def autoloads_device_extension() -> bool:
    """Whether `import torch` loads a device extension, the one way it fails in one line (torch/__init__.py
    `_import_device_backends`: every `torch.backends` entry point, unless `_is_device_backend_autoload_enabled`
    finds TORCH_DEVICE_BACKEND_AUTOLOAD other than "1")."""
    return os.getenv("TORCH_DEVICE_BACKEND_AUTOLOAD", "1") == "1" and bool(entry_points(group="torch.backends"))


def _terminate(signum, frame) -> None:
    raise Terminated(signum)


def handle_signals_from_the_start() -> None:
    """SIGTERM unwinds like Ctrl-C from the first moment (the training loop and the launcher install their own
    handling on top while they run). Python's default for SIGTERM ends the process at once: no line, no release of
    the owner record, which then blocks the folder for the takeover bound on any other host."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)


@contextlib.contextmanager
def signals_after_imports():
    """Ctrl-C or SIGTERM while a command's modules import is acted on once they are imported (a second or two
    later). Raised inside an extension module's import, KeyboardInterrupt can leave that module half made, and the
    library then fails later with an unrelated traceback (seen: numpy's `no attribute '_multiarray_umath'`)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {signum: signal.signal(signum, lambda signum, frame: received.append(signum))
                for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if received and received[0] == signal.SIGINT:
        raise KeyboardInterrupt
    if received:
        raise Terminated(received[0])


# A full disk or a file size limit, reached by a write the command did not expect to fail.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def main(argv: list[str] | None = None) -> int:
    handle_signals_from_the_start()
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = f"edsr-dist {argv[0]}" if argv and argv[0] in COMMANDS else "edsr-dist"
    try:
        return _run(argv)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Terminated as exc:
        print(f"{prog}: stopped by {signal.Signals(exc.signum).name} before it finished; nothing half-written was "
              "kept; run the same command again (train: --resume auto continues a run)", file=sys.stderr, flush=True)
        return 128 + exc.signum


def _run(argv: list[str]) -> int:
    if not argv:
        print(usage(), file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"edsr-dist {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"edsr-dist: unknown command {name!r}{did_you_mean(name, COMMANDS)}; choose one of "
              f"{', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    if name not in WITHOUT_TORCH and importlib.util.find_spec("torch") is None:
        print("edsr-dist: error: PyTorch is not installed; on CPU run `pip install -r requirements-cpu.txt`, "
              "on GPUs/NPUs install the torch build for your hardware first", file=sys.stderr)
        return 2
    module_name, func_name, _ = COMMANDS[name]
    with signals_after_imports():
        if name not in WITHOUT_TORCH and (name not in TORCH_IN_WORKERS or autoloads_device_extension()):
            problem = torch_import_problem()
            if problem:
                print(f"edsr-dist {name}: error: {problem}", file=sys.stderr)
                return 2
        command = importlib.import_module(module_name)
    try:
        return int(getattr(command, func_name)(rest) or 0)
    except UserError as exc:
        print(f"edsr-dist {name}: error: {exc}", file=sys.stderr)
        if exc.end_process_at_once:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(exc.exit_code)
        return exc.exit_code
    except OSError as exc:
        if exc.errno not in DISK_FULL:
            raise
        where = f" writing {exc.filename}" if exc.filename else " writing an output file"
        print(f"edsr-dist {name}: error: {exc.strerror or errno.errorcode.get(exc.errno)}{where}; free space on "
              "that disk (or raise the file size limit, `ulimit -f`) and run again", file=sys.stderr)
        return 2
