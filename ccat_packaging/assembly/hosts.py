"""Where assembly runs: the host that holds the files, reached in-process or over SSH.

A ``HostRunner`` executes tar-agent commands on its host: ``run`` for a command that answers
with one JSON result, ``start`` for ``send``/``receive``, whose archive bytes stream through the
caller. The local runner calls the agent in-process; the SSH runner lives in ``ssh.py``. Agent
failures become the packaging error classes here, in one place, whichever runner produced them.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import ipaddress
import os
import socket
import struct
import threading
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from ccat_packaging.assembly import tar_agent
from ccat_packaging.errors import (
    ArchiveVerificationError,
    ConfigurationError,
    DestinationExistsError,
    InsufficientSpaceError,
    LocationNotWritableError,
    PackagingError,
    RetryableError,
    SourceFileError,
    SourceNotReadyError,
    SpaceReservedError,
    StorageError,
    UnsafePathError,
)
from ccat_packaging.plans import Endpoint

_AGENT_ERRORS: dict[str, type[PackagingError]] = {
    "unsafe_path": UnsafePathError,
    "source_file": SourceFileError,
    "not_ready": SourceNotReadyError,
    "config": ConfigurationError,
    "no_space": InsufficientSpaceError,
    "unwritable": LocationNotWritableError,
    "exists": DestinationExistsError,
    "storage": StorageError,
    "reserved": SpaceReservedError,
    "busy": RetryableError,
    "interrupted": RetryableError,
    "verification": ArchiveVerificationError,
    "io": PackagingError,
}


def agent_error(kind: str, message: str, where: str) -> PackagingError:
    """The packaging error for an agent failure, naming where it happened (location and host)."""
    return _AGENT_ERRORS.get(kind, PackagingError)(f"{where}: {message}")


def describe(endpoint: Endpoint) -> str:
    """How errors name a location: its name and its host as the operations database names it,
    the one name of a host in messages and metadata (whichever way it is reached)."""
    return f"location {endpoint.location_name!r} on {endpoint.host}"


class AgentProcess(Protocol):
    """A running ``send`` (read its archive) or ``receive`` (write it one)."""

    def read(self, size: int) -> bytes:
        """Up to ``size`` bytes of the archive; empty once the sender has stopped."""
        ...

    def write(self, data: bytes) -> None: ...

    def close_input(self) -> None: ...

    def wait(self) -> dict[str, Any]:
        """The command's result, or its failure raised as a packaging error."""
        ...

    def abort(self) -> None:
        """Stop the command; it removes what it had written."""
        ...


class Hosts(Protocol):
    def runner_for(self, endpoint: Endpoint) -> HostRunner:
        """The runner for the host of a location, sharing this run's connections."""
        ...


class HostRunner(Hosts, Protocol):
    """Two runners with the same ``machine`` reach the same files as the same user, so an
    archive can be written in place."""

    machine: str
    via_ssh: bool

    def run(self, command: str, spec: Mapping[str, Any]) -> dict[str, Any]: ...

    def start(self, command: str, spec: Mapping[str, Any]) -> AgentProcess: ...


class LocalRunner:
    """Runs the agent in this process: we are the host that holds the files.

    ``hosts`` is where runners for other locations come from; without it only locations on this
    machine can be reached.
    """

    via_ssh = False
    machine = "local"

    def __init__(self, hosts: Hosts | None = None, endpoint: Endpoint | None = None) -> None:
        self._hosts = hosts
        self._where = describe(endpoint) if endpoint else f"host {socket.gethostname()}"

    def runner_for(self, endpoint: Endpoint) -> HostRunner:
        if self._hosts is not None:
            return self._hosts.runner_for(endpoint)
        if is_same_host(endpoint.host):
            return LocalRunner(endpoint=endpoint)
        raise ConfigurationError(
            f"{describe(endpoint)} is not this machine, and no SSH access is configured"
        )

    def run(self, command: str, spec: Mapping[str, Any]) -> dict[str, Any]:
        try:
            return tar_agent.run_command(command, spec)
        except tar_agent.AgentError as exc:
            raise agent_error(exc.kind, exc.message, self._where) from None

    def start(self, command: str, spec: Mapping[str, Any]) -> AgentProcess:
        return _LocalProcess(command, spec, self._where)


class _LocalProcess:
    """``send`` or ``receive`` on a thread of this process, the archive through a pipe; the
    agent's command table says which end of the pipe the command writes or reads."""

    def __init__(self, command: str, spec: Mapping[str, Any], where: str) -> None:
        entry = tar_agent.COMMANDS.get(command)
        if entry is None or entry.stream is None:
            raise ValueError(f"{command!r} does not stream")
        self._where = where
        self._command = command
        self._result: dict[str, Any] | None = None
        self._error: BaseException | None = None
        read_end, write_end = os.pipe()
        with contextlib.suppress(OSError):  # a larger pipe means fewer wake-ups
            fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 1 << 20)
        if entry.stream == "out":
            self._ours = read_end
            target = functools.partial(self._write_archive, entry.handler, spec, write_end)
        else:
            self._ours = write_end
            target = functools.partial(self._read_archive, entry.handler, spec, read_end)
        self._open = True
        self._thread = threading.Thread(target=target, name=f"agent-{command}", daemon=True)
        self._thread.start()

    def _write_archive(self, handler: Callable[..., Any], spec: Mapping[str, Any], fd: int) -> None:
        try:
            self._result = handler(spec, fd)
        except BaseException as exc:
            self._error = exc
        finally:
            os.close(fd)  # the reader sees the end of the archive (or of a failed one)

    def _read_archive(self, handler: Callable[..., Any], spec: Mapping[str, Any], fd: int) -> None:
        with open(fd, "rb") as stream:  # closing it tells a writer that nobody reads any more
            try:
                self._result = handler(spec, stream)
            except BaseException as exc:
                self._error = exc

    def read(self, size: int) -> bytes:
        return os.read(self._ours, size)

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._ours, view) :]
        except BrokenPipeError:
            raise PackagingError(f"{self._where}: the receiver stopped reading") from None

    def close_input(self) -> None:
        if self._open:
            self._open = False
            os.close(self._ours)

    def wait(self) -> dict[str, Any]:
        self._thread.join()
        self.close_input()
        if isinstance(self._error, tar_agent.AgentError):
            raise agent_error(self._error.kind, self._error.message, self._where)
        if isinstance(self._error, OSError):
            failure = tar_agent.os_failure(self._error, self._command)
            raise agent_error(failure.kind, failure.message, self._where)
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def abort(self) -> None:
        self.close_input()  # the agent's next write fails, or its next read ends
        self._thread.join()


@functools.cache
def _local_names() -> frozenset[str]:
    names = {"localhost", "localhost.localdomain", socket.gethostname(), socket.getfqdn()}
    return frozenset(n.lower() for n in names)


@functools.cache
def _local_addresses() -> frozenset[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Addresses configured on this machine's interfaces, and what its own names resolve to.

    Only configured addresses count: on loopback that is 127.0.0.1 and ::1, so other 127.x
    addresses (which tests use for separate SSH "hosts") are not this machine.
    """
    found = {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")}
    for name in _local_names():
        found.update(_resolve(name))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        for _, interface in socket.if_nameindex():
            try:
                request = struct.pack("256s", interface.encode()[:15])
                reply = fcntl.ioctl(probe.fileno(), 0x8915, request)  # SIOCGIFADDR
                found.add(ipaddress.ip_address(reply[20:24]))
            except OSError:
                pass  # an interface without an IPv4 address
    try:
        with open("/proc/net/if_inet6", encoding="ascii") as table:
            for line in table:
                found.add(ipaddress.ip_address(bytes.fromhex(line.split()[0])))
    except OSError:
        pass  # not Linux, or no IPv6
    return frozenset(found)


@functools.cache
def _resolve(host: str) -> frozenset[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return frozenset()
    return frozenset(ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos)


def is_same_host(host: str) -> bool:
    """True when ``host`` names this machine: its hostname, FQDN, ``localhost``, or a name or
    address that resolves to an address configured here."""
    name = host.strip().lower().removeprefix("[").removesuffix("]")
    if name in _local_names():
        return True
    return not _resolve(name).isdisjoint(_local_addresses())
