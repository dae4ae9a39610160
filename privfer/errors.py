"""The exception types privfer raises for user errors (bad config, bad data).

Every user-facing failure is a subclass of :class:`PrivferError`; the CLI turns
one into a single line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations


class PrivferError(Exception):
    """Base class of every error caused by the user's input, not by a bug."""


class ConfigError(PrivferError, ValueError):
    """A setting is missing, unknown, or outside its allowed range."""


class DataError(PrivferError, ValueError):
    """A data folder or file is missing, malformed, or inconsistent.

    The message names the offending file (and row or column where known).
    """


class RunDirectoryError(PrivferError):
    """A run directory cannot be used: it holds another run, or is unreadable."""
