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


class Terminated(BaseException):
    """SIGTERM (a preemption, `kill`, the launcher stopping its workers) outside a loop that handles it itself: it
    unwinds the command like Ctrl-C does, so every `finally` runs and an owner record is released."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class UserError(Exception):
    """A problem the user can fix (bad flag, bad file, missing device).

    The message must name the problem and the fix in one line.
    """

    exit_code = EXIT_USER_ERROR
    # Set where freeing what the failed work left would crash the process (h5py after a failed write): the command
    # line prints the message and ends the process without Python's teardown.
    end_process_at_once = False


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


class DiskFull(UserError):
    """A write failed for want of space (a full disk, a quota, a file size limit); the message names the file."""


def did_you_mean(word: str, choices) -> str:
    """' (did you mean --epochs?)' for a near miss among `choices`, else ''."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.75)
    return f" (did you mean {close[0]}?)" if close else ""
