"""The one exception type that the command line turns into a one-line error and a non-zero exit."""


class SpanqaError(Exception):
    """A problem with the user's input: its message names what is wrong and where (file, JSON path, flag)."""
