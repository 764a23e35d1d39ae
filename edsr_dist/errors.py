"""User-facing errors and exit codes: one line on stderr, no traceback.

Exit codes of `edsr-dist` commands: 0 done, 2 a UserError (the message names the fix), and for `train` the
ones below, which the launcher explains when it sees them.
"""

import argparse

EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3  # loss or gradients stayed NaN/inf; the last good checkpoint is kept
EXIT_COLLECTIVE_FAILED = 4  # another rank died or stopped responding during a collective
EXIT_INTERRUPTED = 143  # 128 + SIGTERM, as if the signal had ended the process; a checkpoint was written


class UserError(Exception):
    """A problem the user can fix (bad flag, bad file, missing device).

    The message must name the problem and the fix in one line.
    """

    exit_code = EXIT_USER_ERROR


class CommandParser(argparse.ArgumentParser):
    """argparse for every `edsr-dist` command: a bad flag is a UserError (one line, exit 2), not usage text."""

    def error(self, message: str):
        raise UserError(f"{message}; see `{self.prog} --help`")
