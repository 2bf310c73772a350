"""The project's user-facing errors: raised early, naming the problem and the fix. The entry
points print them as one ``error: ...`` line and exit with code 2."""


class ConfigError(ValueError):
    """A bad argument or configuration value. The message says what is wrong and how to fix it."""


class RunError(RuntimeError):
    """The run cannot go on (it diverged, the disk is full, a peer rank hung): the message names
    the cause and what to do; nothing incomplete was left marked complete."""


class DataError(ValueError):
    """A data set is missing, malformed, or asked for with inconsistent options: the message
    names the path, the expected layout or the config key to change."""
