"""User-facing errors and exit codes: one line on stderr, no traceback.

Exit codes of `edsr-dist` commands: 0 done, 2 a UserError (the message names the fix), and for `train` the
ones below, which the launcher explains when it sees them.
"""

import argparse
import difflib

EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3  # loss or gradients stayed NaN/inf; the last good checkpoint is kept
EXIT_COLLECTIVE_FAILED = 4  # another rank died or stopped responding during a collective
# --out s3://...: the run ended but part of it could not be uploaded (the staging folder holds it all); a restart
# with --resume auto uploads what is missing, so the launcher retries it like a failure.
EXIT_UPLOAD_FAILED = 5
# Stopped at a step boundary after rank 0 wrote a checkpoint: 128 + the signal, as if it had ended the process.
# 143 (SIGTERM) is what the launcher sends its workers, so it is the code the launcher looks for; a `train`
# interrupted by Ctrl-C (SIGINT) exits 130.
EXIT_INTERRUPTED = 143


class UserError(Exception):
    """A problem the user can fix (bad flag, bad file, missing device).

    The message must name the problem and the fix in one line.
    """

    exit_code = EXIT_USER_ERROR


class CommandParser(argparse.ArgumentParser):
    """argparse for every `edsr-dist` command: a bad flag is a UserError (one line, exit 2), not usage text."""

    def error(self, message: str):
        if message.startswith("unrecognized arguments:"):
            options = [o for parser in self._with_subparsers() for o in parser._option_string_actions]
            hints = [did_you_mean(arg.split("=")[0], options) for arg in message.split(":", 1)[1].split()
                     if arg.startswith("-")]
            message += "".join(hint for hint in hints if hint)
        raise UserError(f"{message}; see `{self.prog} --help`")

    def _with_subparsers(self) -> list[argparse.ArgumentParser]:
        # A sub-command's unknown option is reported by the top parser, which does not know the sub-command's options.
        found = [self]
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                found += list(action.choices.values())
        return found


# Flag groups that several commands share (eval, sr, export, bench): one definition each, so a flag reads and
# behaves the same everywhere. `to` is a parser or an argument group.

def add_device_flags(to, devices, precisions, precision_default: str | None, precision_help: str) -> None:
    """--device and --precision; the choices come from config (DEVICES, PRECISIONS), the default and help from the
    command (what fp32 or None means differs between eval, sr and bench)."""
    to.add_argument("--device", choices=devices, default="auto")
    to.add_argument("--precision", choices=precisions, default=precision_default, help=precision_help)


def add_object_store_flags(to, inputs: str = "s3:// inputs", cached: str = "s3:// inputs are cached") -> None:
    """--cache-dir and --endpoint-url for commands whose inputs may be s3:// URLs."""
    to.add_argument("--cache-dir", default="", metavar="DIR",
                    help=f"where {cached} (default: EDSR_DIST_CACHE, else ~/.cache/edsr-dist)")
    to.add_argument("--endpoint-url", default="", metavar="URL",
                    help=f"object store endpoint for {inputs} (default: AWS_ENDPOINT_URL(_S3), else AWS)")


def add_res_scale_flag(to) -> None:
    to.add_argument("--res-scale", type=float, default=None,
                    help="residual scaling for plain weight files (default 0.1 for 256 filters, else 1.0)")


def add_raw_weights_flag(to) -> None:
    to.add_argument("--raw-weights", action="store_true",
                    help="a checkpoint's raw weights instead of the EMA of the weights it holds (runs with --ema-decay)")


def at_least(flag: str, value, minimum, why: str = "") -> None:
    """The range check of a command's number flag, after parsing: nothing when `value` is None (not given) or at
    least `minimum`; else "--flag must be >= N, got V", or with `why` "--flag V: why"."""
    if value is None or value >= minimum:
        return
    shown = f"{value:g}" if isinstance(value, float) else value
    raise UserError(f"{flag} {shown}: {why}" if why else f"{flag} must be >= {minimum}, got {value}")


def did_you_mean(word: str, choices) -> str:
    """' (did you mean --epochs?)' for a near miss among `choices`, else ''."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.75)
    return f" (did you mean {close[0]}?)" if close else ""
