"""User-facing errors: one line on stderr, exit code 2, no traceback."""


class UserError(Exception):
    """A problem the user can fix (bad flag, bad file, missing device).

    The message must name the problem and the fix in one line.
    """

    exit_code = 2
