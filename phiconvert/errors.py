"""The one exception type whose message is shown to the user as a single line."""


class PhiconvertError(Exception):
    """A user-facing failure: the CLI prints ``error: <message>`` and exits with a non-zero code."""
