"""The errors a user can act on, each mapped to the contract's exit status."""


class InputError(Exception):
    """The input cannot be analyzed (exit status 2).

    The message is one plain line naming the file or series and the reason,
    never patient identifiers.
    """

    exit_status = 2

    def __init__(self, where, reason: str):
        self.where = str(where)
        self.reason = reason
        super().__init__(f"{self.where}: {reason}")
