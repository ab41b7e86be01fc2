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
    """No SSH connection could be made (refused, timed out, name not resolved, no banner)."""

    def __init__(self, message: str, host: str) -> None:
        super().__init__(message)
        self.host = host


class ConnectionDroppedError(RetryableError):
    """An established connection broke while a command ran; the remote agent stops itself."""


class StalledError(RetryableError):
    """An agent command moved no bytes for ``CCAT_STALL_SECONDS``: a source disk or network
    mount, a remote agent or a receiver stopped answering. The command was told to stop (it
    removes its temporary file once it can) and the step gives up its pool slot; whatever hung
    may answer again by the next attempt.

    ``moved`` is how many bytes the command had moved; ``reached`` says, once known, which file
    that is in the archive."""

    def __init__(
        self, where: str, command: str, seconds: float, moved: int, stopped: str, reached: str = ""
    ) -> None:
        self.where, self.command, self.seconds = where, command, seconds
        self.moved, self.stopped = moved, stopped
        at = f" (in {reached})" if reached else ""
        idle = f"moved no bytes for {seconds:g} s after {moved} bytes{at}"
        super().__init__(f"{where}: {command} {idle}; {stopped}")

    def reaching(self, reached: str) -> StalledError:
        """The same stall, saying which file of the archive it had reached."""
        return StalledError(
            self.where, self.command, self.seconds, self.moved, self.stopped, reached
        )


class DagsterUnavailableError(PackagingError):
    """The Dagster webserver or daemon that would launch an operator's runs does not answer."""


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
    """The buffer has not the room for the package (the next buffer may have)."""


class LocationNotWritableError(PackagingError):
    """The buffer refuses writes: no permission, or a read-only file system (the next buffer
    may take the package)."""


class DestinationExistsError(PackagingError):
    """Something that is not this package stands at the archive's final path; it is never
    overwritten, and trying again cannot help."""


class StorageError(RetryableError):
    """A disk or network file system failed an operation (I/O error, stale NFS handle, timed
    out): often passing, so worth another attempt."""


class SpaceReservedError(RetryableError):
    """The buffer has room for the package only once the packages being written into it now
    are done: their predicted sizes are reserved. Another buffer may take it at once, else
    waiting for a retry can help."""


class ArchiveVerificationError(PackagingError):
    """The written archive does not match what was predicted from the filed files."""


class HostKeyError(ConfigurationError):
    """The host's key is not in the known-hosts file, or differs from the key recorded there."""


class AuthenticationFailedError(ConfigurationError):
    """The host refused the configured key (or passphrase)."""
