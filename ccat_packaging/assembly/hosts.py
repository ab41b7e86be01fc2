"""Where assembly runs: the host that holds the files, reached in-process or over SSH.

A ``HostRunner`` executes tar-agent commands on its host: ``run`` for a command that answers
with one JSON result, ``start`` for ``send``/``receive``, whose archive bytes stream through the
caller. The local runner calls the agent in this process, on a thread whose progress the
caller watches; the SSH runner lives in ``ssh.py``. Either fails a command that moves no bytes
for ``CCAT_STALL_SECONDS`` with ``StalledError``. Agent failures become the packaging error
classes here, in one place, whichever runner produced them.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import ipaddress
import os
import select
import socket
import struct
import threading
import time
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
    StalledError,
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


class Meter:
    """The bytes that one run's agent commands were seen to move, wherever they run: its
    package's heartbeat beats only while this grows, so a stalled assembly's lease goes stale
    instead of being kept alive."""

    def __init__(self) -> None:
        self.moved = 0

    def add(self, count: int) -> None:
        self.moved += count


class LocalRunner:
    """Runs the agent in this process: we are the host that holds the files. ``hosts`` is
    where runners for other locations come from."""

    via_ssh = False
    machine = "local"

    def __init__(
        self, hosts: Hosts, endpoint: Endpoint, meter: Meter, stall_seconds: float
    ) -> None:
        self._hosts = hosts
        self._where = describe(endpoint)
        self._meter = meter
        self._stall_seconds = stall_seconds

    def runner_for(self, endpoint: Endpoint) -> HostRunner:
        return self._hosts.runner_for(endpoint)

    def run(self, command: str, spec: Mapping[str, Any]) -> dict[str, Any]:
        return self._process(command, spec).wait()

    def start(self, command: str, spec: Mapping[str, Any]) -> AgentProcess:
        return self._process(command, spec)

    def _process(self, command: str, spec: Mapping[str, Any]) -> _LocalProcess:
        return _LocalProcess(command, spec, self._where, self._meter, self._stall_seconds)


class _LocalProcess:
    """An agent command on a thread of this process, watched by the caller's thread.

    A blocked system call (a source mount that stopped answering, a buffer disk that hangs)
    cannot be interrupted, so the command runs on a thread of its own while the caller waits
    for its progress: when that stands still for ``stall_seconds``, the caller fails with
    ``StalledError`` and cancels the command, which removes its temporary file, under the
    package's lock, as soon as the call returns. ``send`` and ``receive`` stream the archive
    through a pipe; the agent's command table says which end the command writes or reads, and
    the bytes through it are their progress as seen from here.
    """

    def __init__(
        self,
        command: str,
        spec: Mapping[str, Any],
        where: str,
        meter: Meter,
        stall_seconds: float,
    ) -> None:
        entry = tar_agent.COMMANDS.get(command)
        if entry is None:
            raise ValueError(f"unknown agent command {command!r}")
        self._command = command
        self._where = where
        self._meter = meter
        self._stall_seconds = stall_seconds
        self._progress = tar_agent.Progress()
        self._seen = 0
        self._stalled = False
        self._result: dict[str, Any] | None = None
        self._error: BaseException | None = None
        self._ours: int | None = None
        if entry.stream is None:
            target = functools.partial(self._run, entry.handler, spec)
        else:
            read_end, write_end = os.pipe()
            with contextlib.suppress(OSError):  # a larger pipe means fewer wake-ups
                fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 1 << 20)
            if entry.stream == "out":
                self._ours = read_end
                target = functools.partial(self._write_archive, entry.handler, spec, write_end)
            else:
                self._ours = write_end
                target = functools.partial(self._read_archive, entry.handler, spec, read_end)
            os.set_blocking(self._ours, False)  # waited for with a bound, in _ready
        self._thread = threading.Thread(target=target, name=f"agent-{command}", daemon=True)
        self._thread.start()

    def _run(self, handler: Callable[..., Any], spec: Mapping[str, Any]) -> None:
        try:
            self._result = handler(spec, self._progress)
        except BaseException as exc:
            self._error = exc

    def _write_archive(self, handler: Callable[..., Any], spec: Mapping[str, Any], fd: int) -> None:
        try:
            self._result = handler(spec, fd, self._progress)
        except BaseException as exc:
            self._error = exc
        finally:
            os.close(fd)  # the reader sees the end of the archive (or of a failed one)

    def _read_archive(self, handler: Callable[..., Any], spec: Mapping[str, Any], fd: int) -> None:
        with open(fd, "rb") as stream:  # closing it tells a writer that nobody reads any more
            try:
                self._result = handler(spec, stream, self._progress)
            except BaseException as exc:
                self._error = exc

    def read(self, size: int) -> bytes:
        while True:
            self._ready(select.POLLIN)
            try:
                return os.read(self._pipe(), size)
            except BlockingIOError:
                continue

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                self._ready(select.POLLOUT)
                with contextlib.suppress(BlockingIOError):
                    view = view[os.write(self._pipe(), view) :]
        except BrokenPipeError:
            raise PackagingError(f"{self._where}: the receiver stopped reading") from None

    def _pipe(self) -> int:
        if self._ours is None:
            raise ValueError(f"{self._command!r} does not stream")
        return self._ours

    def _ready(self, event: int) -> None:
        """Wait until the pipe can be read or written; the command at its other end stalled
        when it cannot for ``stall_seconds``."""
        poller = select.poll()
        poller.register(self._pipe(), event)
        ready = poller.poll(self._stall_seconds * 1000)
        self._observe()
        if not ready:
            raise self._stall()

    def close_input(self) -> None:
        if self._ours is not None:
            os.close(self._ours)
            self._ours = None

    def wait(self) -> dict[str, Any]:
        try:
            self._join()
        except BaseException:  # interrupted (run terminated) or stalled: the command stops too
            self.abort()
            raise
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

    def _join(self) -> None:
        """Wait for the command to end, for as long as its progress moves."""
        poll = min(1.0, self._stall_seconds / 8)
        last_change = time.monotonic()
        while True:
            self._thread.join(poll)
            if not self._thread.is_alive():
                self._observe()
                return
            if self._observe():
                last_change = time.monotonic()
            elif time.monotonic() - last_change >= self._stall_seconds:
                raise self._stall()

    def _observe(self) -> bool:
        """Pass the command's new progress to the meter; True if there was any."""
        moved = self._progress.moved
        self._meter.add(moved - self._seen)
        advanced, self._seen = moved != self._seen, moved
        return advanced

    def _stall(self) -> StalledError:
        self._stalled = True
        self.abort()
        return StalledError(
            self._where,
            self._command,
            self._stall_seconds,
            self._progress.moved,
            "it was told to stop and removes its temporary file once its blocked system call "
            "returns",
        )

    def abort(self) -> None:
        """Cancel the command and close our end of its pipe (its next write fails, or its next
        read ends); wait for it to clean up, but no longer than a stall lasts: a command stuck
        in a system call removes its temporary file itself once the call returns."""
        self._progress.cancel()
        self.close_input()
        if not self._stalled:
            self._thread.join(self._stall_seconds)


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
