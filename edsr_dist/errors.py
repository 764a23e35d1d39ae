"""User-facing errors: one line on stderr, exit code 2, no traceback."""

import argparse
import difflib


class UserError(Exception):
    """A problem the user can fix (bad flag, bad file, missing device).

    The message must name the problem and the fix in one line.
    """

    exit_code = 2


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


def did_you_mean(word: str, choices) -> str:
    """' (did you mean --epochs?)' for a near miss among `choices`, else ''."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.75)
    return f" (did you mean {close[0]}?)" if close else ""
