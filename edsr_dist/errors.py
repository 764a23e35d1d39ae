"""User-facing errors: one line on stderr, exit code 2, no traceback."""

import argparse


class UserError(Exception):
    """A problem the user can fix (bad flag, bad file, missing device).

    The message must name the problem and the fix in one line.
    """

    exit_code = 2


class CommandParser(argparse.ArgumentParser):
    """argparse for every `edsr-dist` command: a bad flag is a UserError (one line, exit 2), not usage text."""

    def error(self, message: str):
        raise UserError(f"{message}; see `{self.prog} --help`")
