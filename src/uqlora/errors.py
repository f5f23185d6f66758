"""One exception type for every user-facing mistake.

Entry points catch :class:`UqloraError` and print its message as a single line
(``error: ...``) instead of a traceback: the message must name the bad value and the
valid choices.
"""


class UqloraError(Exception):
    """A bad input or an unavailable resource, explained in one line."""


class DataError(UqloraError):
    """A dataset that is unknown, missing, malformed or unreachable."""


class ModelError(UqloraError):
    """A model that is unknown, missing or unreachable."""
