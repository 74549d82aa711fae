"""The one exception type ESA raises for bad input; the CLI prints it as a one-line error."""


class ESAError(ValueError):
    """Bad input or an impossible request, reported to the user as ``esa: error: <message>``."""
