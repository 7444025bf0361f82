"""The serving package's exceptions. Each message says what to do about it."""


class ServingError(RuntimeError):
    """Base class of every error the serving code raises on purpose."""
