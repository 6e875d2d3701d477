"""memllm's error types. Each carries one line that names the key, file or record at fault.

The CLI prints any :class:`MemllmError` as ``memllm <command>: error: <line>`` and exits 2.
"""

from __future__ import annotations


class MemllmError(ValueError):
    """Base class: a problem the user can fix, described in one line."""


class ConfigError(MemllmError):
    """A config key that is unknown, of the wrong type, or impossible."""


class BackboneError(MemllmError):
    """A model that cannot be loaded or is not supported."""


class CheckpointError(MemllmError):
    """A memory checkpoint that is missing, corrupt or does not fit the model."""


class DataError(MemllmError):
    """A data file or record that is malformed (names the file and record)."""


USER_ERRORS: tuple[type[BaseException], ...] = (MemllmError, FileNotFoundError)
