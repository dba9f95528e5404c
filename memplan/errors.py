"""The one exception type a user sees: a bad input, reported as one line (CLI exit status 2)."""


class MemplanError(ValueError):
    """An input memplan cannot plan for: unknown model, malformed config, impossible layout.

    The message is a single line that names the problem; the CLI prints it and exits with 2.
    """
