"""The project's user-facing error: raised early, naming the problem and the fix."""


class ConfigError(ValueError):
    """A bad argument or configuration value. The message says what is wrong and how to fix it."""
