"""Errors the library raises on purpose. The CLI prints them as one line."""


class QAdapterError(Exception):
    """Base class: a problem the user can fix, described in the message."""


class ConfigError(QAdapterError, ValueError):
    """A setting is out of range, or a config file is malformed."""


class DataError(QAdapterError, ValueError):
    """A data file or record is malformed; the message names the file and line."""


class ModelError(QAdapterError):
    """A model cannot be loaded, or an adapter does not match its base model."""
