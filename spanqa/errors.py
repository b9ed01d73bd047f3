"""The one exception type that the command line turns into a one-line error and a non-zero exit."""


class SpanqaError(Exception):
    """A problem with the user's input: its message names what is wrong and where (file, JSON path, flag).

    `quiet`: another process (rank 0 of the job) reports it; this one exits non-zero without printing the
    same line again."""

    def __init__(self, message: str, quiet: bool = False):
        super().__init__(message)
        self.quiet = quiet


def report(prog: str, err: SpanqaError) -> int:
    """Print the one line (unless another rank does) and return the exit status."""
    import sys

    if not err.quiet:
        print(f"{prog}: error: {err}", file=sys.stderr)
    return 2
