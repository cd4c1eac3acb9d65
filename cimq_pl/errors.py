"""The one exception type for bad user input.

Anything a user can get wrong (a config value, a path, a checkpoint) raises :class:`ConfigError` with a
one-line message naming the bad value and what is allowed. The CLI prints that line and exits non-zero
instead of a traceback.
"""


class ConfigError(ValueError):
    """Bad user input: the message names the value and what is allowed."""
