"""The one exception type raised for bad data input.

Every message names the problem AND how to fix it (the path, the expected layout, the
config key to change), so a user never has to read this package's source to recover.
"""

from __future__ import annotations


class DataError(ValueError):
    """A data set is missing, malformed, or asked for with inconsistent options."""
