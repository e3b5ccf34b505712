"""The one error type for bad input data; its message always names the file (and line when known)."""


class DataError(ValueError):
    """Raw or prepared data that cannot be used as it is."""
