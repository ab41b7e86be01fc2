"""Where assembly runs: the host that holds the files, reached in-process or over SSH.

A ``HostRunner`` executes one tar-agent command on its host and returns the agent's JSON
result; the local runner calls the agent in-process. Agent failures become the packaging
error classes here, in one place, whichever runner produced them.
"""

from __future__ import annotations

import functools
import socket
from typing import Any, Protocol

from ccat_packaging.assembly import tar_agent
from ccat_packaging.errors import (
    ArchiveVerificationError,
    InsufficientSpaceError,
    PackagingError,
    RetryableError,
    SourceFileError,
    UnsafePathError,
)

_AGENT_ERRORS: dict[str, type[PackagingError]] = {
    "unsafe_path": UnsafePathError,
    "source_file": SourceFileError,
    "no_space": InsufficientSpaceError,
    "busy": RetryableError,
    "verification": ArchiveVerificationError,
    "io": PackagingError,
}


def agent_error(kind: str, message: str, host: str) -> PackagingError:
    """The packaging error for an agent failure, naming the host it happened on."""
    return _AGENT_ERRORS.get(kind, PackagingError)(f"on {host}: {message}")


class HostRunner(Protocol):
    host: str
    via_ssh: bool

    def run(self, command: str, spec: dict[str, Any]) -> dict[str, Any]: ...


class LocalRunner:
    """Runs the agent in this process: we are the host that holds the files."""

    via_ssh = False

    def __init__(self) -> None:
        self.host = socket.gethostname()

    def run(self, command: str, spec: dict[str, Any]) -> dict[str, Any]:
        try:
            return tar_agent.run_command(command, spec)
        except tar_agent.AgentError as exc:
            raise agent_error(exc.kind, exc.message, self.host) from None


@functools.cache
def _local_names() -> frozenset[str]:
    names = {"localhost", "localhost.localdomain", "127.0.0.1", "::1"}
    hostname = socket.gethostname()
    fqdn = socket.getfqdn()
    names.update({hostname, fqdn})
    for name in (hostname, fqdn):
        try:
            for info in socket.getaddrinfo(name, None):
                names.add(str(info[4][0]))
        except OSError:
            pass
    return frozenset(n.lower() for n in names)


def is_same_host(host: str) -> bool:
    """True when ``host`` names this machine (hostname, FQDN, localhost or an own address)."""
    return host.lower() in _local_names()
