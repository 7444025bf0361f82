"""Errors of the monitoring package (it does not import the pipeline's errors)."""


class MonitoringError(Exception):
    """Base of every error the monitoring package raises."""


class MonitoringConfigError(MonitoringError, ValueError):
    """A monitoring setting or param is invalid; the message says which and what is allowed."""
