"""Exceptions the vitcc CLI turns into a one-line message and an exit code."""


class VitccError(Exception):
    """Bad input or usage: the CLI prints str(e) on one line and exits with `exit_code`."""

    exit_code = 2


class VerificationError(VitccError):
    """The compiled model was checked against the original and does not match."""

    exit_code = 3
