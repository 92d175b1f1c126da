"""Exceptions with messages that name the file or field at fault and the reason."""

from __future__ import annotations


class CaiError(Exception):
    """Base class for every error cosmicai raises on bad input; the CLI prints it without a traceback."""


class ConfigError(CaiError, ValueError):
    """A run config, payload or option is invalid (names the key and the reason)."""


class DataError(CaiError, ValueError):
    """A dataset, partition or manifest is missing, malformed or corrupt (names the file and the reason)."""


class ModelError(CaiError, ValueError):
    """Model weights or model inputs are invalid (names the keys, shapes or device at fault)."""


class UnsafePickleError(DataError):
    """A pickle asked for a global that is not allow-listed; it was refused and nothing was executed."""


class StorageError(CaiError, OSError):
    """A storage URL could not be read, written or listed."""


class OutOfMemoryError(CaiError, MemoryError):
    """Reading, decoding or predicting ran out of memory; the message names the partition, its size and what to
    change."""
