"""The errors a user can act on, each mapped to the contract's exit status."""
import re

_CONTROL = re.compile(r"[\x00-\x1f\x7f\u2028\u2029\x85]")


def one_line(text: str) -> str:
    """``text`` with every control character written as an escape (``\\n``, ``\\x00``).

    Error messages quote values read from the input (a file name, a transfer syntax UID):
    a hostile or broken file can put a newline in them, which would split the contract's
    one-line error over several lines.
    """
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], str(text))


class InputError(Exception):
    """The input cannot be analyzed (exit status 2).

    The message is one plain line naming the file or series and the reason,
    never patient identifiers.
    """

    exit_status = 2

    def __init__(self, where, reason: str):
        self.where = one_line(where)
        self.reason = one_line(reason)
        super().__init__(f"{self.where}: {self.reason}")
