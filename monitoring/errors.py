"""The monitoring package's exceptions. Each message says what to do about it."""


class MonitoringError(Exception):
    """Base class of every error the monitoring code raises on purpose."""


class MonitoringConfigError(MonitoringError, ValueError):
    """A monitoring setting or policy value is invalid (raised at construction, before any work)."""
