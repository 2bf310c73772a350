"""The checks that recur across the package, one function per rule, so that every refusal of the
same kind reads the same way: ``<name> must be ..., got <value>`` and, where given, the fix."""

from twolevel_dist.errors import ConfigError


def positive_int(name: str, value, *, error: type = ConfigError, fix: str = "") -> None:
    """``value`` is an int (not a bool) of at least 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise error(f"{name} must be a positive integer, got {value!r}"
                    + (f"; {fix}" if fix else ""))


def positive_number(name: str, value, *, error: type = ConfigError) -> None:
    """``value`` is an int or float (not a bool) above 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise error(f"{name} must be a positive number, got {value!r}")


def dropout_probability(value, *, error: type = ConfigError) -> None:
    """A dropout probability: in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise error(f"dropout must be in [0, 1), got {value!r}")
