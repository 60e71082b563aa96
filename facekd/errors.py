"""Errors a user can act on. The CLI prints them as one line; anything else is a bug."""

from __future__ import annotations

import os


class FacekdError(Exception):
    """Base class of every error caused by bad input rather than by a bug."""


class DataError(FacekdError):
    """A file (or a record inside one) that cannot be used, with the reason."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):
        # rebuilt from (path, reason), so it crosses process boundaries (worker pools)
        return type(self), (self.path, self.reason)


class ConfigError(FacekdError):
    """A configuration value that is missing, unknown or of the wrong type."""
