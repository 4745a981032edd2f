"""The one exception type that the CLI turns into a one-line message and exit status 2."""


class QpassError(Exception):
    """A problem with the user's input: the message names the bad value and the way out."""
