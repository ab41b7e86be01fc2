"""Error classes that tell the job whether trying again can help.

Retryable errors (a host that is down, a dropped connection, a busy lock) go through the op's
retry policy; everything else fails the package at once with a message that names the host,
location and file concerned.
"""

from __future__ import annotations


class PackagingError(Exception):
    """Base class; ``retryable`` says whether the same attempt may succeed later."""

    retryable = False


class RetryableError(PackagingError):
    retryable = True


class ClaimConflictError(RetryableError):
    """Another run claimed files of the same group concurrently; trying again resolves it."""


class DatabaseUnavailableError(RetryableError):
    """The operations database dropped or refused a connection."""


class HostUnreachableError(RetryableError):
    """A host could not be reached or the connection to it dropped."""

    def __init__(self, message: str, host: str) -> None:
        super().__init__(message)
        self.host = host


class ConfigurationError(PackagingError):
    """The operations database describes something packaging cannot work with."""


class NoActiveBufferError(ConfigurationError):
    pass


class SourceFileError(PackagingError):
    """A source file is missing, changed since it was filed, or not a regular file."""


class SourceNotReadyError(RetryableError):
    """A source file is smaller on disk than filed: most likely still being written."""


class UnsafePathError(PackagingError):
    """A relative path that is absolute, contains ``..`` or NUL, or leads outside its root."""


class InsufficientSpaceError(PackagingError):
    pass


class ArchiveVerificationError(PackagingError):
    """The written archive does not match what was predicted from the filed files."""
