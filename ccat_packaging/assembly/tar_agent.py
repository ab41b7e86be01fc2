"""The one tar assembler: deterministic bytes, checksum in the same pass, nothing half-written.

This module imports only Python's standard library on purpose: the same file runs in-process
when we are the host that holds the files, and is shipped unchanged to a remote host and run
there with ``python3`` otherwise, so a package has the same bytes and checksum wherever it is
built. It is driven by JSON-able specs and answers with JSON-able results; failures are
``AgentError`` with a ``kind`` the caller maps to its own error classes. Every command counts
the bytes it moves in a ``Progress`` its caller watches, which tells a stalled command from a
slow one. When the buffer is on another host, ``send`` writes the archive to a stream instead
of a file and ``receive`` on the buffer's host writes that stream to a file, checking the
sender's checksum before it counts.

Archive format: GNU tar headers written by ``tarfile`` (integer mtimes, no user/group names),
member data padded to 512 bytes, two zero blocks, padded to a 10240-byte record. Its size is
exactly predictable from member names and sizes, which catches truncation and short reads.

Throughput (docs/performance.md): one pass over the data; reading, hashing and writing overlap
on threads; the next files are opened and requested from the disk ahead of their turn; and
neither the files read nor the archive written stay in the page cache, so the kernel reuses a
few pages instead of filling memory (which on some virtual machines costs more than the disk).

Remote hosts may have no more than Python 3.8, and run this file as ``python3 -I -S``: hence
no imports beyond the standard library and no newer syntax outside annotations. The file reads
top-down: constants, the JSON types of each command's spec and result, the commands, the
command table and ``main``, then the machinery the commands share.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import functools
import hashlib
import io
import json
import os
import queue
import signal
import stat
import sys
import tarfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple, TypedDict

BLOCK = 512
RECORD = tarfile.RECORDSIZE  # 20 blocks
BUFFER_SIZE = 1 << 20
BUFFER_COUNT = 16
ALGORITHM = "sha256"
# Source files opened ahead of the one being archived, their first bytes requested from the
# disk at once (POSIX_FADV_WILLNEED): small files are then read many at a time, not one by one.
READ_AHEAD_FILES = 32
READ_AHEAD_BYTES = 32 << 20
# Every data byte is read once and written once, so neither side is kept in the page cache
# (see _copy_member and _WriteBehind); this is also what lets the kernel reuse the same pages
# instead of finding new ones for every step.
CACHE_STEP = 32 << 20
CACHE_LAG = 4 * CACHE_STEP
DIRECTORY_FDS = 64
# ``checksum`` reads a whole archive once, sequentially: large blocks mean few system calls.
HASH_BLOCK = 8 << 20
# How long a command stopped because its caller went away may take to clean up before the
# process exits anyway.
STOP_GRACE_SECONDS = 30
# In a buffer's root: the directory of the space reservations of the assemblies writing into
# the buffer (``_reserve_space``), and the lock under which they are counted and made. It is
# held for a few system calls, so waiting longer than this means the filesystem is in trouble.
RESERVATIONS = ".ccat-reservations"
RESERVATIONS_LOCK = "buffer.lock"
RESERVATIONS_LOCK_SECONDS = 30


# The JSON boundary. A spec is what ``json.loads`` makes of the caller's request (arrays are
# lists), a result is what the caller gets back as JSON; a key of a ``total=False`` class may
# be left out.


class AgentError(Exception):
    """``kind`` is one of: unsafe_path, source_file, not_ready, no_space, reserved, unwritable,
    exists, storage, busy, verification, config, io, interrupted. ``reserved``: the package
    would fit into the buffer but for the space that assemblies writing into it now have
    reserved (``_reserve_space``)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


# What an operating-system error means for a package, by errno: the kind says whether trying
# again (storage, interrupted) or another buffer (no_space, unwritable) can help.
_ERRNO_KINDS = {
    errno.ENOSPC: "no_space",
    errno.EDQUOT: "no_space",
    errno.EACCES: "unwritable",
    errno.EPERM: "unwritable",
    errno.EROFS: "unwritable",
    errno.EEXIST: "exists",
    errno.EISDIR: "exists",
    errno.ENOTDIR: "exists",
    errno.EIO: "storage",
    errno.ESTALE: "storage",
    errno.ETIMEDOUT: "storage",
    errno.ENOLINK: "storage",
    getattr(errno, "EREMOTEIO", errno.EIO): "storage",  # Linux's; remote hosts may be other
    errno.EPIPE: "interrupted",
    errno.ECONNRESET: "interrupted",
}


def os_failure(exc: OSError, doing: str) -> AgentError:
    """An operating-system error while ``doing`` something at the destination, as an
    ``AgentError`` naming the error and the path (source files have ``_source_error``)."""
    return AgentError(_ERRNO_KINDS.get(exc.errno or 0, "io"), f"{doing}: {_explain(exc)}")


def _source_error(relative: str, exc: OSError) -> AgentError:
    """An operating-system error on a source file: only a failing disk or mount is worth
    trying again; anything else (no permission, ...) needs the file fixed."""
    retry = _ERRNO_KINDS.get(exc.errno or 0) == "storage"
    return AgentError(
        "storage" if retry else "source_file",
        f"cannot read source file {relative!r}: {_explain(exc)}",
    )


def _explain(exc: OSError) -> str:
    code = errno.errorcode.get(exc.errno or 0, "?")
    where = f" ({exc.filename})" if exc.filename else ""
    return f"{exc.strerror or exc} [{code}]{where}"


class Progress:
    """The bytes a command has moved so far, which its caller watches, and the caller's way to
    stop it.

    A command that stops moving (a source disk or mount that no longer answers, a reader or
    writer at the other end that went quiet) sits in a system call nothing can interrupt. Its
    caller notices that ``moved`` stood still for too long, gives up and calls ``cancel``: the
    command then fails with ``interrupted`` at its next step, as soon as that call returns, and
    removes its temporary file as any failure does. Every command takes one; ``discard`` has
    nothing to count, ``publish`` only when it reads a file already at the final name.
    """

    def __init__(self) -> None:
        self.moved = 0  # one writer (the command), read by its caller: the GIL suffices
        self._cancelled = False

    def advance(self, count: int) -> None:
        if self._cancelled:
            raise AgentError("interrupted", "stopped: its caller saw no progress and gave up")
        self.moved += count

    def cancel(self) -> None:
        self._cancelled = True


class _FiledChecksums(TypedDict, total=False):
    checksums: dict[str, list[str]]  # {relative_path: [algorithm, filed checksum]}


class SendSpec(_FiledChecksums):
    """The files of a package; each must have its filed size and, where one is given, its
    filed checksum, else nothing counts."""

    source_root: str
    members: list[list[Any]]  # [[relative_path, filed_size], ...] in archive order


class _Destination(TypedDict):
    dest_root: str  # a location root, which must exist already
    dest_relative: str  # the archive's final path under it


class BuildSpec(SendSpec, _Destination):
    """The files of a package and where their archive goes."""


class ReceiveSpec(_Destination):
    size: int  # the predicted archive size; the sender's checksum line follows that many bytes


class FileIdentity(TypedDict):
    """The temporary archive as ``build`` or ``receive`` left it, fsynced and hashed: the
    later steps act only on this file. A file renamed or hard-linked over its name has
    another inode; a write to it changes mtime and ctime, and nobody can set a ctime back."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int


class _Temporary(TypedDict):
    temp_path: str  # as returned by build or receive
    identity: FileIdentity  # as returned with it


class VerifySpec(TypedDict):
    path: str  # the temporary archive, which must still have ``identity``
    identity: FileIdentity
    members: list[list[Any]]  # [[relative_path, size], ...] in archive order


class _PublishOptions(TypedDict, total=False):
    mode: int | None  # the published file's permission bits; left out or null: 0o666 & ~umask


class PublishSpec(_Destination, _Temporary, _PublishOptions):
    size: int  # the archive's size and sha256: what a file already at the final name must
    checksum: str  # have to be taken for this package


class DiscardSpec(_Temporary):
    dest_root: str  # the location root the temporary archive is under


class _ChecksumOptions(TypedDict, total=False):
    algorithm: str | None  # a hashlib name; left out, null or empty means ALGORITHM


class ChecksumSpec(_ChecksumOptions):
    root: str
    relative_path: str


class FreeSpaceSpec(TypedDict):
    root: str


class SendResult(TypedDict):
    size: int
    checksum: str  # hex digest of the archive's bytes
    algorithm: str  # always ALGORITHM
    members: int
    seconds: float


class BuildResult(SendResult, _Temporary):
    """The archive, not yet under its final name."""


class ReceiveResult(_Temporary):
    size: int
    checksum: str
    algorithm: str
    seconds: float


class VerifyResult(TypedDict):
    size: int
    members: int


class PublishResult(TypedDict):
    path: str
    adopted: bool  # the final name already held this package's bytes (an earlier attempt's)


class DiscardResult(TypedDict):
    removed: bool  # False if it was gone already


class ChecksumResult(TypedDict):
    path: str
    size: int
    algorithm: str
    checksum: str


class FreeSpaceResult(TypedDict):
    free: int  # bytes an unprivileged writer may still use
    total: int


def check_relative_path(path: str) -> str:
    """Refuse paths that could leave their root: absolute, ``..``, empty parts, NUL."""
    if not path or "\0" in path:
        raise AgentError("unsafe_path", f"relative path {path!r} is empty or contains NUL")
    if path.startswith("/"):
        raise AgentError("unsafe_path", f"relative path {path!r} is absolute")
    parts = path.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise AgentError(
            "unsafe_path", f"relative path {path!r} has an empty, '.' or '..' component"
        )
    return path


def predicted_size(members: list[tuple[str, int]]) -> int:
    """The exact archive size for members (name, size), as this module writes it."""
    total = sum(_header_size(name) + _padded(size) for name, size in members) + 2 * BLOCK
    return (total + RECORD - 1) // RECORD * RECORD


def position(members: list[tuple[str, int]], offset: int) -> str:
    """Which file byte ``offset`` of the archive of members (name, size) belongs to, in words:
    a stalled command is reported with the file it had reached."""
    start = 0
    for name, size in members:
        data = start + _header_size(name)
        if offset < data:
            return f"the header of {name!r}"
        if offset < data + _padded(size):
            return f"{name!r} at its byte {min(offset - data, size)} of {size}"
        start = data + _padded(size)
    return "the end of the archive, after its last file"


# The commands. Each is called with its spec (and, if COMMANDS says it streams, the stream)
# and a Progress, and returns its result.


def build(spec: BuildSpec, progress: Progress) -> BuildResult:
    """Write the archive (``BuildSpec``) under a temporary name next to its final name,
    fsynced, so that ``publish`` can give it that name atomically once it is verified; the
    ``BuildResult`` has its size and checksum. Nothing is left behind on failure."""
    started = time.monotonic()
    root_real, members = _source(spec)
    need = predicted_size(members)
    with _temporary_archive(spec["dest_root"], spec["dest_relative"], need) as (fd, temp_path):
        result = _write_predicted(fd, spec, root_real, members, need, started, progress)
        identity = _identity(os.fstat(fd))
    return {"temp_path": temp_path, "identity": identity, **result}


def send(spec: SendSpec, out_fd: int, progress: Progress) -> SendResult:
    """Write the archive (``SendSpec``) to ``out_fd`` instead of a file, for a buffer on
    another host: the caller passes the bytes to ``receive`` there, and then the checksum of
    the ``SendResult``. Same bytes as ``build``."""
    started = time.monotonic()
    root_real, members = _source(spec)
    need = predicted_size(members)
    return _write_predicted(out_fd, spec, root_real, members, need, started, progress)


def receive(spec: ReceiveSpec, stream: io.BufferedReader, progress: Progress) -> ReceiveResult:
    """Write an archive arriving on ``stream`` under a temporary name, hashing it on the way,
    like ``build`` does, for the same ``publish`` (``ReceiveSpec``, ``ReceiveResult``). After
    exactly ``size`` bytes the stream carries one line, the sender's checksum: it must equal
    the checksum of what arrived, else nothing is kept."""
    started = time.monotonic()
    need = int(spec["size"])
    with _temporary_archive(spec["dest_root"], spec["dest_relative"], need) as (fd, temp_path):
        pipe = _Pipeline(fd, progress)
        try:
            short = AgentError("io", f"the archive stream ended before its {need} bytes arrived")
            pipe.copy_from(stream.readinto, need, short)
            pipe.finish()
        except BaseException:
            pipe.close()
            raise
        digest = pipe.digest.hexdigest()
        sent = stream.readline(256).strip().decode("ascii", "replace")
        if sent != digest:
            raise AgentError(
                "verification",
                f"received {need} bytes with sha256 {digest}, but the sender's checksum was "
                f"{sent or 'never sent'}",
            )
        identity = _identity(os.fstat(fd))
    return {
        "temp_path": temp_path,
        "identity": identity,
        "size": need,
        "checksum": digest,
        "algorithm": ALGORITHM,
        "seconds": time.monotonic() - started,
    }


def verify(spec: VerifySpec, progress: Progress) -> VerifyResult:
    """Check a written archive before it is published, without re-reading its data: exact
    size, member headers, and that it is still the file the build hashed (its ``identity``)
    (``VerifySpec``, ``VerifyResult``); the headers read are its progress."""
    path = spec["path"]
    expected = [(p, int(s)) for p, s in spec["members"]]
    need = predicted_size(expected)
    # Unbuffered, so that reading a header reads nothing but the header's pages.
    with open(_open_nofollow(path), "rb", buffering=0) as handle:
        actual_size = os.fstat(handle.fileno()).st_size
        if actual_size != need:
            raise AgentError(
                "verification", f"{path} has {actual_size} bytes, {need} expected (truncated?)"
            )
        _prefetch_headers(handle.fileno(), expected)
        try:
            with tarfile.open(
                fileobj=handle, mode="r:", encoding="utf-8", errors="surrogateescape"
            ) as archive:
                found = []
                for member in archive:
                    found.append((member.name, member.size))
                    progress.advance(member.offset_data - member.offset)
        except tarfile.TarError as exc:  # a damaged first header: not a tar any more
            raise AgentError("verification", f"{path} is not a valid archive: {exc}") from None
        _check_identity(path, handle.fileno(), spec["identity"])
    if found != expected:
        missing = [m for m in expected if m not in found][:3]
        extra = [m for m in found if m not in expected][:3]
        raise AgentError(
            "verification",
            f"{path} members differ from the package's files: missing {missing}, extra {extra}",
        )
    return {"size": actual_size, "members": len(found)}


def publish(spec: PublishSpec, progress: Progress) -> PublishResult:
    """Give the verified temporary archive its final name, never replacing anything there
    (``PublishSpec``, ``PublishResult``).

    What gets the name is the file ``build`` or ``receive`` wrote and hashed, the one with the
    spec's ``identity``: it is opened and checked, then linked by its descriptor
    (``/proc/self/fd``), so a file swapped in under its name after the check is not what gets
    published. Until then it is 0600, which nobody else can change; it gets its ``mode`` just
    before the link. link(2) gives the name atomically and fails if it exists, where rename(2)
    would replace it; the directory is then fsynced so a crash cannot lose the name. A file
    already at the final name is this package only if it has the package's size and checksum:
    an earlier attempt published it and died before the database recorded it, so it is
    adopted. Anything else there (another file, a directory) is left untouched and the package
    fails.
    """
    dest_relative = check_relative_path(spec["dest_relative"])
    final = os.path.join(spec["dest_root"], dest_relative)
    base = os.path.basename(dest_relative)
    temp_path = spec["temp_path"]
    temp_name = os.path.basename(temp_path)
    if os.path.dirname(temp_path) != os.path.dirname(final) or not temp_name.startswith(
        f".{base}.partial."
    ):
        raise AgentError("config", f"{temp_path} is not a temporary archive of {final}")
    dir_fd = _open_dir(spec["dest_root"], os.path.dirname(dest_relative), create=False)
    try:
        try:
            fd = _open_temporary(temp_path, spec["identity"], dir_fd)
        except FileNotFoundError:
            if not _exists(base, dir_fd):  # the temporary archive went missing
                raise AgentError(
                    "verification", f"the temporary archive {temp_path} is gone; nothing published"
                ) from None
            _check_identical(dir_fd, final, spec, progress)  # this step ran before and published
            os.fsync(dir_fd)  # the attempt that linked it may have died before its fsync
            return {"path": final, "adopted": True}
        try:
            os.fchmod(fd, _archive_mode(spec.get("mode")))
            os.link(f"/proc/self/fd/{fd}", base, dst_dir_fd=dir_fd)
        except FileNotFoundError:  # the kernel links no file that has lost its last name
            raise AgentError(
                "verification",
                f"{temp_path} was replaced or removed while being published; nothing published",
            ) from None
        except FileExistsError:
            _check_identical(dir_fd, final, spec, progress)
            os.unlink(temp_name, dir_fd=dir_fd)
            os.fsync(dir_fd)
            return {"path": final, "adopted": True}
        except OSError as exc:
            if exc.errno in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
                raise AgentError(
                    "config",
                    f"cannot give {final} its name with link(2): {_explain(exc)}; buffers need "
                    "a file system with hard links (publishing never replaces a file, which "
                    "rename would)",
                ) from None
            raise
        finally:
            os.close(fd)
        os.unlink(temp_name, dir_fd=dir_fd)
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return {"path": final, "adopted": False}


def discard(spec: DiscardSpec, progress: Progress) -> DiscardResult:
    """Remove a temporary archive that will not be published (``DiscardSpec``,
    ``DiscardResult``); one that is gone already is no error, so a retry is harmless. Only the
    file the build wrote (its inode) is removed: whatever else stands under its name is not
    ours, and is left alone."""
    temp_path = spec["temp_path"]
    directory, name = os.path.split(temp_path)
    relative_dir = os.path.relpath(directory, spec["dest_root"])
    relative_dir = "" if relative_dir == "." else check_relative_path(relative_dir)
    try:
        dir_fd = _open_dir(spec["dest_root"], relative_dir, create=False)
    except FileNotFoundError:
        return {"removed": False}
    try:
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return {"removed": False}
        identity = spec["identity"]
        if (st.st_dev, st.st_ino) != (identity["dev"], identity["ino"]):
            return {"removed": False}
        return {"removed": _remove(name, dir_fd)}
    finally:
        os.close(dir_fd)


def checksum(spec: ChecksumSpec, progress: Progress) -> ChecksumResult:
    """Hash a published archive again, for an operator checking it at rest (``ChecksumSpec``,
    ``ChecksumResult``); the build never does this (it hashes while writing). One sequential
    read in large blocks."""
    algorithm = spec.get("algorithm") or ALGORITHM
    if algorithm not in hashlib.algorithms_available:
        raise AgentError("config", f"unknown checksum algorithm {algorithm!r}")
    relative = check_relative_path(spec["relative_path"])
    path = os.path.join(spec["root"], relative)
    dir_fd = _open_dir(spec["root"], os.path.dirname(relative), create=False)
    try:
        size, digest = _hash_file(dir_fd, path, algorithm, progress)
    finally:
        os.close(dir_fd)
    return {"path": path, "size": size, "algorithm": algorithm, "checksum": digest}


def free_space(spec: FreeSpaceSpec, progress: Progress) -> FreeSpaceResult:
    """The space left on the file system of a buffer's root, for the backlog's record of it
    (``FreeSpaceSpec``, ``FreeSpaceResult``); what an assembly checks before it writes is
    ``_reserve_space``, which also counts the other assemblies' reservations."""
    vfs = os.statvfs(spec["root"])
    return {"free": vfs.f_bavail * vfs.f_frsize, "total": vfs.f_blocks * vfs.f_frsize}


# The command table, and running a command as a process.


class Command(NamedTuple):
    """A command, and whether it streams an archive besides its spec: that tells a caller (and
    ``main``) how to call it and which end of a pipe to keep. ``stream`` None:
    ``handler(spec, progress)``, one result; ``"out"``: ``handler(spec, fd, progress)`` also
    writes the archive to ``fd``; ``"in"``: ``handler(spec, reader, progress)`` also reads an
    archive from ``reader``. What ``send`` writes on one host is what ``receive`` reads on
    another."""

    handler: Callable[..., Any]
    stream: str | None


COMMANDS = {
    "build": Command(build, None),
    "send": Command(send, "out"),
    "receive": Command(receive, "in"),
    "verify": Command(verify, None),
    "publish": Command(publish, None),
    "discard": Command(discard, None),
    "checksum": Command(checksum, None),
    "free_space": Command(free_space, None),
}


def run_command(command: str, spec: Mapping[str, Any], progress: Progress) -> dict[str, Any]:
    """Dispatch one command that needs nothing but its spec (a streaming one also needs its
    stream and is called directly)."""
    entry = COMMANDS.get(command)
    if entry is None or entry.stream is not None:
        raise AgentError("config", f"{command!r} is not an agent command that answers alone")
    try:
        return entry.handler(spec, progress)
    except OSError as exc:
        raise os_failure(exc, command) from None


def main(argv: list[str]) -> int:
    """``python3 tar_agent.py COMMAND SPEC [EVERY]``: one JSON result line, exit 0 or 3.

    SPEC is a JSON file, or ``-``: then the spec is the first line on stdin, and the rest of
    stdin is the archive for a command that streams ``in`` and otherwise the caller's lifeline
    (its end stops the command). The result line goes to stdout, except for a command that
    streams ``out``, whose stdout is the archive: its result is the last line on stderr. With
    EVERY (seconds), a line ``{"progress": BYTES}`` goes before it every EVERY seconds in which
    the command moved bytes, so that a caller who gives up after some silence gives up on a
    command that stopped moving, not on one that takes long.
    """
    command, spec_arg = argv[1], argv[2]
    stream = COMMANDS[command].stream if command in COMMANDS else None
    stdin = open(0, "rb", closefd=False)  # noqa: SIM115 (lives as long as the process)
    if spec_arg == "-":
        spec = json.loads(stdin.readline())
        if stream != "in":
            _stop_when_caller_leaves(stdin)
    else:
        with open(spec_arg, encoding="utf-8") as handle:
            spec = json.load(handle)
    report = _Report(sys.stderr if stream == "out" else sys.stdout)
    progress = Progress()
    if len(argv) > 3:
        report.progress_of(progress, float(argv[3]))
    try:
        if stream is None:
            outcome = run_command(command, spec, progress)  # which also refuses unknown ones
        else:
            archive = sys.stdout.fileno() if stream == "out" else stdin
            outcome = COMMANDS[command].handler(spec, archive, progress)
        result: dict[str, Any] = {"ok": outcome}
        code = 0
    except AgentError as exc:
        result, code = {"error": {"kind": exc.kind, "message": exc.message}}, 3
    except OSError as exc:
        failure = os_failure(exc, command)
        result, code = {"error": {"kind": failure.kind, "message": failure.message}}, 3
    report.last(result)
    return code


class _Report:
    """The stream a command's caller reads its result from: progress lines, then the result,
    never interleaved."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        self._done = False

    def progress_of(self, progress: Progress, every: float) -> None:
        def report() -> None:
            reported = 0
            while not self._done:
                time.sleep(every)
                moved = progress.moved
                if moved != reported:
                    self._line({"progress": moved})
                    reported = moved

        threading.Thread(target=report, daemon=True).start()

    def last(self, result: dict[str, Any]) -> None:
        self._line(result, last=True)

    def _line(self, value: dict[str, Any], last: bool = False) -> None:
        with self._lock:  # the result and the end of progress lines in one step
            if self._done:
                return
            self._done = last
            try:
                self._stream.write(json.dumps(value) + "\n")
                self._stream.flush()
            except OSError:
                pass  # nobody is listening any more: the connection is gone


def _stop_when_caller_leaves(stdin: io.BufferedReader) -> None:
    """Stop this command once its stdin ends.

    A remote caller holds our stdin open for as long as it waits for the result, and sshd
    closes it when the connection drops or the caller gives up; a timeout on the caller's side
    does not stop a remote process by itself. The SIGTERM becomes an ``AgentError`` in the main
    thread, whose way out removes the temporary file; if that hangs, exit anyway.
    """

    def watch() -> None:
        while stdin.read1(1 << 16):
            pass
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(STOP_GRACE_SECONDS)
        os._exit(143)

    signal.signal(signal.SIGTERM, _interrupted)
    threading.Thread(target=watch, daemon=True).start()


def _interrupted(signum: int, frame: object) -> None:
    raise AgentError("interrupted", "stopped because the caller went away (connection closed)")


# The machinery the commands share, each part after its first user.


def _source(spec: SendSpec) -> tuple[str, list[tuple[str, int]]]:
    """The real source root and the checked members; every member is opened once up front so
    bad input is refused before anything is written."""
    members = [(check_relative_path(p), int(s)) for p, s in spec["members"]]
    source_root = spec["source_root"]
    if not os.path.isdir(source_root):
        raise AgentError("io", f"source root {source_root!r} does not exist or is not a directory")
    root_real = os.path.realpath(source_root)
    tree = _SourceTree(root_real)
    try:
        for relative, filed_size in members:
            os.close(tree.open(relative, filed_size)[0])
    finally:
        tree.close()
    return root_real, members


class _SourceTree:
    """Opens a package's source files for reading, following no symlink below the root.

    Each directory is opened from the root's descriptor one component at a time, none of them
    a symlink (``_descend``), and then kept open (a few at a time), so a file is opened
    relative to a directory reached that way: one system call per file, and a directory
    swapped for a symlink at any moment cannot lead outside the root. A symlink inside the
    root is refused even where it stays inside: whoever writes the source tree can re-point it
    at any time, and the instruments write real directories."""

    def __init__(self, root_real: str) -> None:
        self.root_real = root_real
        self._root = os.open(root_real, _OPEN_ROOT)
        self._directories: dict[str, int] = {}

    def _directory(self, relative_dir: str, relative: str) -> int:
        fd = self._directories.get(relative_dir)
        if fd is not None:
            return fd
        try:
            fd = _descend(self._root, relative_dir, False, self.root_real)
        except _Symlinked as link:
            raise AgentError(
                "unsafe_path",
                f"source file {relative!r} lies under a symlink, {link.path}; symlinks are never "
                "followed in source paths",
            ) from None
        except FileNotFoundError:
            raise AgentError("source_file", f"source file {relative!r} is missing") from None
        except OSError as exc:
            raise _source_error(relative, exc) from None
        if len(self._directories) >= DIRECTORY_FDS:
            os.close(self._directories.pop(next(iter(self._directories))))
        self._directories[relative_dir] = fd
        return fd

    def open(self, relative: str, filed_size: int) -> tuple[int, os.stat_result]:
        """The member opened for reading, after its kind and size were checked.

        Only a regular file is ever opened: opening a named pipe waits for a writer that may
        never come, and opening a device can act on it (a tape rewinds). ``O_NONBLOCK`` covers
        a file swapped for a pipe between the check and the open, and ``fstat`` then refuses it.
        """
        relative_dir, _, name = relative.rpartition("/")
        directory = self._directory(relative_dir, relative)
        try:
            _check_kind(relative, os.stat(name, dir_fd=directory, follow_symlinks=False))
            fd = os.open(name, _OPEN_MEMBER, dir_fd=directory)
        except FileNotFoundError:
            raise AgentError("source_file", f"source file {relative!r} is missing") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise AgentError("unsafe_path", f"source file {relative!r} is a symlink") from None
            raise _source_error(relative, exc) from None
        try:
            st = os.fstat(fd)
            _check_kind(relative, st)
            os.set_blocking(fd, True)
            _check_member(relative, filed_size, st)
        except BaseException:
            os.close(fd)
            raise
        return fd, st

    def close(self) -> None:
        while self._directories:
            os.close(self._directories.popitem()[1])
        os.close(self._root)


_OPEN_MEMBER = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a named pipe"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def _check_kind(relative: str, st: os.stat_result) -> None:
    if stat.S_ISLNK(st.st_mode):
        raise AgentError("unsafe_path", f"source file {relative!r} is a symlink")
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _KINDS if test(st.st_mode)), "of an unknown kind")
        raise AgentError(
            "source_file", f"source file {relative!r} is not a regular file but {kind}"
        )


def _check_member(relative: str, filed_size: int, st: os.stat_result) -> None:
    if st.st_size < filed_size:
        raise AgentError(
            "not_ready",
            f"source file {relative!r} has {st.st_size} of its {filed_size} filed bytes on "
            "disk: still being written",
        )
    if st.st_size > filed_size:
        raise AgentError(
            "source_file",
            f"source file {relative!r} has {st.st_size} bytes on disk but {filed_size} were "
            "filed: it changed since filing",
        )


@contextlib.contextmanager
def _temporary_archive(dest_root: str, dest_relative: str, need: int) -> Iterator[tuple[int, str]]:
    """A new temporary file (0600) next to the archive's final name, under the package's lock
    and only if ``need`` bytes fit beside what the other assemblies writing into this buffer
    still need (``_reserve_space``); fsynced when the block succeeds, removed when it fails.
    Its directory is reached from the buffer's root without following a symlink
    (``_open_dir``), and everything in it is made relative to that descriptor."""
    dest_relative = check_relative_path(dest_relative)
    relative_dir, base = os.path.split(dest_relative)
    dest_dir = os.path.join(dest_root, relative_dir)
    dir_fd = _open_dir(dest_root, relative_dir, create=True)
    reservation: tuple[int, str, int] | None = None
    try:
        lock_fd = _open_lock(dir_fd, os.path.join(dest_dir, f".{base}.lock"))
        try:
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise AgentError(
                    "busy", f"{dest_relative} is being built by another process"
                ) from None
            _remove_partials(dir_fd, base)
            fd, temp_name, reservation = _reserve_space(dest_root, dest_relative, dir_fd, need)
            temp_path = os.path.join(dest_dir, temp_name)
            try:
                yield fd, temp_path
                os.fsync(fd)
            except OSError as exc:
                os.close(fd)
                os.unlink(temp_name, dir_fd=dir_fd)
                raise os_failure(exc, f"writing {temp_path}") from None
            except BaseException:
                os.close(fd)
                os.unlink(temp_name, dir_fd=dir_fd)
                raise
            os.close(fd)
        finally:
            if reservation is not None:  # the file holds its bytes itself now, or is gone
                _release(*reservation)
            os.close(lock_fd)
    finally:
        os.close(dir_fd)


def _open_lock(dir_fd: int, path: str) -> int:
    """The lock file ``path`` (in ``dir_fd``), opened for ``flock``; 0600, so that no other
    user can open it and hold its lock to fail our builds as busy. A symlink there is never
    followed (its target would be created), and a lock another user owns is refused: it could
    be held by anyone. One of ours readable by others is made 0600."""
    try:
        fd = os.open(os.path.basename(path), _OPEN_LOCK, 0o600, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise AgentError(
                "unsafe_path", f"the lock {path} is a symlink, which is never followed; remove it"
            ) from None
        exc.filename = path
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        os.close(fd)
        raise AgentError(
            "unsafe_path",
            f"the lock {path} is not a file of ours (owner uid {st.st_uid}, we are "
            f"{os.geteuid()}): anyone could hold it; remove it",
        )
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.fchmod(fd, 0o600)
    return fd


# O_NONBLOCK: a named pipe planted as a lock fails to open instead of waiting for a reader.
_OPEN_LOCK = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def _reserve_space(
    root: str, dest_relative: str, dest_fd: int, need: int
) -> tuple[int, str, tuple[int, str, int]]:
    """A new temporary file (descriptor, name in ``dest_fd``) for the archive
    ``dest_relative`` of the buffer at ``root``, and the reservation of ``need`` bytes of the
    buffer for it (to ``_release``).

    Assemblies into one buffer run in separate processes, possibly started from different hosts
    (a build in place, a ``receive`` of a stream), and the buffer's filesystem is all they
    share; free space alone would let two of them start on room for one, and one would then
    run out of space mid-write. So each registers its need in a file under ``RESERVATIONS``
    and holds a lock on that file while it writes; it starts only if its need fits into the
    free space less what the others' reservations still need (their need less what their
    temporary files hold already). Counting and registering happen under one lock of the whole
    buffer, so two never count the same free space. A reservation nobody holds a lock on
    belonged to a process that died writing: ``_reservations`` clears it.
    """
    directory = _open_dir(root, RESERVATIONS, create=True)
    dest_dir = os.path.dirname(os.path.join(root, dest_relative))
    try:
        with _reservations_locked(directory, os.path.join(root, RESERVATIONS)):
            others = _reservations(root, directory)
            vfs = os.fstatvfs(dest_fd)
            free = vfs.f_bavail * vfs.f_frsize
            if free < need:
                raise AgentError(
                    "no_space", f"not enough space in {dest_dir}: need {need} bytes, have {free}"
                )
            reserved = sum(left for _, left in others)
            if free - reserved < need:
                holders = ", ".join(f"{archive} ({left} bytes to go)" for archive, left in others)
                raise AgentError(
                    "reserved",
                    f"{dest_dir} has room only once the packages being written into it are "
                    f"done: need {need} bytes, have {free}, of which {reserved} are reserved by "
                    f"{holders}",
                )
            base = os.path.basename(dest_relative)
            fd, temp_name = _create(dest_fd, f".{base}.partial.", "")
            partial = os.path.join(os.path.dirname(dest_relative), temp_name)
            try:
                ticket = _reserve(directory, dest_relative, need, partial)
            except BaseException:
                os.close(fd)
                os.unlink(temp_name, dir_fd=dest_fd)
                raise
    except BaseException:
        os.close(directory)
        raise
    return fd, temp_name, ticket


def _create(dir_fd: int, prefix: str, suffix: str) -> tuple[int, str]:
    """A new file of ours (0600, a random name) in ``dir_fd``, open for writing."""
    name = f"{prefix}{os.urandom(8).hex()}{suffix}"
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    return os.open(name, flags, 0o600, dir_fd=dir_fd), name


@contextlib.contextmanager
def _reservations_locked(directory: int, path: str) -> Iterator[None]:
    """The buffer-wide lock under which reservations are counted and made (``directory`` is
    ``path``, open)."""
    fd = _open_lock(directory, os.path.join(path, RESERVATIONS_LOCK))
    try:
        deadline = time.monotonic() + RESERVATIONS_LOCK_SECONDS
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise AgentError(
                        "busy",
                        f"the space reservations in {path} stayed locked for "
                        f"{RESERVATIONS_LOCK_SECONDS} s",
                    ) from None
                time.sleep(0.01)
        yield
    finally:
        os.close(fd)


def _reservations(root: str, directory: int) -> list[tuple[str, int]]:
    """(archive, bytes it still needs) of every assembly writing into the buffer now; called
    under the buffer's lock, clearing the reservations of processes that died."""
    live = []
    for entry in sorted(os.listdir(directory)):
        if not entry.endswith(".json"):
            continue
        try:
            fd = os.open(entry, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=directory)
        except FileNotFoundError:
            continue  # released meanwhile
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:  # its process is writing; it wrote this file in full first
                reservation = json.loads(os.pread(fd, 1 << 16, 0))
                held = _partial(root, reservation["partial"], _blocks)
                live.append((reservation["archive"], max(0, reservation["need"] - (held or 0))))
                continue
            if os.fstat(fd).st_nlink:  # never released (that unlinks it before unlocking)
                _clear_stale(root, directory, entry, fd)
        finally:
            os.close(fd)
    return live


def _clear_stale(root: str, directory: int, entry: str, fd: int) -> None:
    """Remove the reservation of a process that died writing, and its temporary file: that
    will never be published, since nobody got its name. A crash then costs the buffer neither
    reserved nor written space. The file may be empty if its process died making it."""
    with contextlib.suppress(ValueError, KeyError, TypeError, AgentError, FileNotFoundError):
        _partial(root, json.loads(os.pread(fd, 1 << 16, 0))["partial"], os.unlink)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(entry, dir_fd=directory)


def _blocks(name: str, dir_fd: int) -> int:
    """The space a file takes already."""
    return os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_blocks * 512


def _partial(root: str, partial: str, act: Callable[..., Any]) -> Any:
    """``act(name, dir_fd=...)`` on a reservation's temporary file, reached from the buffer's
    root like every other (``_open_dir``); None if it is gone."""
    relative_dir, name = os.path.split(check_relative_path(partial))
    try:
        dir_fd = _open_dir(root, relative_dir, create=False)
    except FileNotFoundError:
        return None
    try:
        return act(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    finally:
        os.close(dir_fd)


def _reserve(directory: int, archive: str, need: int, partial: str) -> tuple[int, str, int]:
    """Make a reservation and take its lock, under the buffer's lock, so that nobody sees it
    unlocked while its process lives. The ticket keeps ``directory`` open, for ``_release``."""
    fd, name = _create(directory, "", ".json")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        record = {"archive": archive, "need": need, "partial": partial, "pid": os.getpid()}
        os.write(fd, json.dumps(record).encode("utf-8"))
    except BaseException:
        os.close(fd)
        os.unlink(name, dir_fd=directory)
        raise
    return fd, name, directory


def _release(fd: int, name: str, directory: int) -> None:
    """Unlinked before its lock goes: a reservation found unlocked but still linked is then
    certainly one whose process died."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=directory)
    os.close(fd)
    os.close(directory)


def _open_dir(root: str, relative_dir: str, create: bool) -> int:
    """The directory ``relative_dir`` under the location ``root``, open (a descriptor to
    close), made with its parents if ``create``. The root is as configured; below it no
    symlink is followed, so nothing is read, written or linked outside the location."""
    try:
        root_fd = os.open(root, _OPEN_ROOT)
    except (FileNotFoundError, NotADirectoryError):
        raise AgentError(
            "io", f"location root {root!r} does not exist or is not a directory"
        ) from None
    try:
        return _descend(root_fd, relative_dir, create, root)
    except _Symlinked as link:
        raise AgentError(
            "unsafe_path",
            f"{link.path} is a symlink, which is never followed below a location root (it "
            "could lead outside it); replace it with a directory",
        ) from None
    finally:
        os.close(root_fd)


class _Symlinked(Exception):
    """A directory on a path below a root is a symlink; ``path`` names it."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.path = path


def _descend(root_fd: int, relative_dir: str, create: bool, shown: str) -> int:
    """The directory ``relative_dir`` below ``root_fd`` (which is ``shown``), opened one
    component at a time relative to its parent's descriptor, none of them a symlink
    (``_Symlinked``); with ``create``, a missing one is made and its parent fsynced, so that
    the new directory survives a crash with what is written into it. An error names the
    component's full path."""
    fd = os.dup(root_fd)
    walked = shown
    try:
        for part in relative_dir.split("/") if relative_dir else ():
            walked = os.path.join(walked, part)
            try:
                child = _open_child(fd, part, create, walked)
            except OSError as exc:
                exc.filename = walked
                raise
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_child(parent: int, name: str, create: bool, path: str) -> int:
    while True:
        try:
            return os.open(name, _OPEN_DIRECTORY, dir_fd=parent)
        except FileNotFoundError:
            if not create:
                raise
        except OSError as exc:  # ENOTDIR, or ELOOP: a symlink, or not a directory at all
            if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
                raise
            mode = os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode
            if stat.S_ISLNK(mode) or stat.S_ISDIR(mode):  # a directory now: a symlink just now
                raise _Symlinked(path) from None
            raise
        try:
            os.mkdir(name, 0o777, dir_fd=parent)
        except FileExistsError:
            continue  # made by another process meanwhile
        os.fsync(parent)


_OPEN_ROOT = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_OPEN_DIRECTORY = _OPEN_ROOT | os.O_NOFOLLOW


def _remove_partials(dir_fd: int, base: str) -> None:
    """Temporary files of earlier, crashed attempts; only called while holding the lock."""
    prefix = f".{base}.partial."
    for entry in os.listdir(dir_fd):
        if entry.startswith(prefix):
            os.unlink(entry, dir_fd=dir_fd)


def _identity(st: os.stat_result) -> FileIdentity:
    return {
        "dev": st.st_dev,
        "ino": st.st_ino,
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,
    }


def _open_temporary(path: str, identity: FileIdentity, dir_fd: int | None = None) -> int:
    """The temporary archive at ``path`` (its name in ``dir_fd`` if given), open for reading,
    if it is still the file with ``identity``."""
    fd = _open_nofollow(path, dir_fd)
    try:
        _check_identity(path, fd, identity)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_nofollow(path: str, dir_fd: int | None = None) -> int:
    """``path`` (its name in ``dir_fd`` if given) open for reading; a symlink is refused."""
    name = path if dir_fd is None else os.path.basename(path)
    try:
        fd = os.open(
            name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd
        )
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        raise AgentError("verification", f"{path} is a symlink, not the build's file") from None
    return fd


def _check_identity(path: str, fd: int, identity: FileIdentity) -> None:
    """Refuse unless the file open as ``fd`` (at ``path``) is the one with ``identity``."""
    found = _identity(os.fstat(fd))
    if found != identity:
        changed = ", ".join(
            f"{key} {identity[key]} -> {found[key]}"  # type: ignore[literal-required]
            for key in found
            if found[key] != identity[key]  # type: ignore[literal-required]
        )
        raise AgentError(
            "verification",
            f"{path} is not the file the build wrote and hashed ({changed}): replaced or "
            "changed since; nothing published",
        )


def _archive_mode(mode: int | None) -> int:
    """The permission bits of a published archive: ``mode`` if set, else what the process's
    umask leaves of 0o666, as for any file it creates."""
    if mode is not None:
        return int(mode) & 0o777
    return 0o666 & ~_umask()


def _umask() -> int:
    """The umask, read without changing it: os.umask sets one, which the other threads of an
    in-process agent would see. Only where the kernel does not show it (before Linux 4.7) is
    it set and set back, restrictive for that instant."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as status:
        for line in status:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def _exists(name: str, dir_fd: int) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _check_identical(dir_fd: int, final: str, spec: PublishSpec, progress: Progress) -> None:
    """Refuse, naming ``final`` (in ``dir_fd``), unless it is a regular file with the
    package's bytes."""
    st = os.stat(os.path.basename(final), dir_fd=dir_fd, follow_symlinks=False)
    advice = "it was left untouched; move it away if it is not needed, then requeue"
    if not stat.S_ISREG(st.st_mode):
        kinds = (*_KINDS, (stat.S_ISLNK, "a symlink"))
        kind = next((name for test, name in kinds if test(st.st_mode)), "of an unknown kind")
        raise AgentError("exists", f"{final} is already there and is {kind}; {advice}")
    if (
        st.st_size == int(spec["size"])
        and _hash_file(dir_fd, final, ALGORITHM, progress)[1] == spec["checksum"]
    ):
        return
    raise AgentError(
        "exists",
        f"{final} is already there and is another file ({st.st_size} bytes; this package has "
        f"{spec['size']} bytes, sha256 {spec['checksum']}); {advice}",
    )


def _hash_file(dir_fd: int, path: str, algorithm: str, progress: Progress) -> tuple[int, str]:
    """Size and hex digest of the file ``path`` (its name in ``dir_fd``), read once
    sequentially in large blocks."""
    digest = hashlib.new(algorithm)
    size = 0
    fd = os.open(os.path.basename(path), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    with open(fd, "rb", buffering=0) as handle:
        _advise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        block = memoryview(bytearray(HASH_BLOCK))
        while count := handle.readinto(block):
            digest.update(block[:count])
            size += count
            progress.advance(count)
    return size, digest.hexdigest()


def _remove(name: str, dir_fd: int) -> bool:
    """Unlink ``name`` in ``dir_fd``; False if it was gone already."""
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    return True


def _write_predicted(
    out_fd: int,
    spec: SendSpec,
    root_real: str,
    members: list[tuple[str, int]],
    need: int,
    started: float,
    progress: Progress,
) -> SendResult:
    """Write the archive and insist on exactly the predicted size; the result ``build`` and
    ``send`` report."""
    filed = spec.get("checksums", {})
    digest, total = _write_archive(out_fd, root_real, members, filed, progress)
    if total != need:
        raise AgentError("verification", f"wrote {total} bytes but {need} were predicted")
    return {
        "size": total,
        "checksum": digest,
        "algorithm": ALGORITHM,
        "members": len(members),
        "seconds": time.monotonic() - started,
    }


def _write_archive(
    out_fd: int,
    root_real: str,
    members: list[tuple[str, int]],
    filed: dict[str, list[str]],
    progress: Progress,
) -> tuple[str, int]:
    """Write the archive; ``filed`` maps members to their filed [algorithm, checksum], which
    their bytes must match (checked in the same pass, on a thread of its own)."""
    checks = {path: _MemberCheck(path, alg, value) for path, (alg, value) in filed.items()}
    tree = _SourceTree(root_real)
    ahead = _ReadAhead(tree, members)
    pipe = _Pipeline(out_fd, progress, check_members=bool(checks))
    try:
        for relative, fd, st in ahead:
            try:
                pipe.emit(_header(relative, st))
                _copy_member(pipe, relative, fd, st, checks.get(relative))
            finally:
                os.close(fd)
            pipe.emit(b"\0" * (-st.st_size % BLOCK))
        pipe.emit(b"\0" * (2 * BLOCK))
        pipe.emit(b"\0" * (-pipe.total % RECORD))
        pipe.finish()
    except BaseException:
        pipe.close()
        raise
    finally:
        ahead.close()
        tree.close()
    problems = [p for check in checks.values() if (p := check.problem())]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise AgentError("source_file", problems[0] + more)
    return pipe.digest.hexdigest(), pipe.total


class _MemberCheck:
    """A member's filed checksum, compared with the checksum of the bytes put in the archive.

    The operations database holds checksums as bare hex beside their algorithm, in either case,
    or as ``<algorithm>:<hex>``; any other form is a filing error, reported as such, so that it
    is never mistaken for a file altered since filing."""

    def __init__(self, relative: str, algorithm: str, filed: str) -> None:
        self.relative = relative
        self.algorithm = algorithm.strip().lower()
        try:
            self.hasher: Any = (
                _Adler32() if self.algorithm == "adler32" else hashlib.new(self.algorithm)
            )
        except ValueError:
            raise AgentError(
                "config", f"filed checksum of {relative!r} uses unknown algorithm {algorithm!r}"
            ) from None
        width = 2 * (self.hasher.digest_size or 0)
        prefix, colon, digits = filed.strip().lower().rpartition(":")
        if (colon and prefix != self.algorithm) or not _is_hex(digits, width):
            raise AgentError(
                "source_file",
                f"the filed {self.algorithm} checksum of {relative!r} is not one: {filed!r} "
                f"(expected {width or 'fixed-length'} hex digits, optionally after "
                f"'{self.algorithm}:'); correct the filing",
            )
        self.expected = digits

    def problem(self) -> str | None:
        actual = self.hasher.hexdigest()
        if actual == self.expected:
            return None
        return (
            f"source file {self.relative!r} was altered since filing: filed {self.algorithm} "
            f"{self.expected}, now {actual}"
        )


def _is_hex(digits: str, width: int) -> bool:
    return width > 0 and len(digits) == width and all(c in "0123456789abcdef" for c in digits)


class _Adler32:
    """zlib's adler32 behind hashlib's interface (what Rucio and FTS verify)."""

    digest_size = 4

    def __init__(self) -> None:
        self._value = 1

    def update(self, data: memoryview) -> None:
        self._value = zlib.adler32(data, self._value)

    def hexdigest(self) -> str:
        return f"{self._value:08x}"


class _ReadAhead:
    """The members in order, each opened (and checked) a little ahead of its turn with the
    kernel asked to start reading it, up to READ_AHEAD_FILES files or READ_AHEAD_BYTES."""

    def __init__(self, tree: _SourceTree, members: list[tuple[str, int]]) -> None:
        self._tree = tree
        self._members = iter(members)
        self._opened: collections.deque[tuple[str, int, os.stat_result, int]]
        self._opened = collections.deque()
        self._bytes = 0
        self._exhausted = False

    def __iter__(self) -> Iterator[tuple[str, int, os.stat_result]]:
        return self

    def __next__(self) -> tuple[str, int, os.stat_result]:
        while not self._exhausted and (
            not self._opened
            or (len(self._opened) < READ_AHEAD_FILES and self._bytes < READ_AHEAD_BYTES)
        ):
            member = next(self._members, None)
            if member is None:
                self._exhausted = True
                break
            fd, st = self._tree.open(*member)
            ahead = min(st.st_size, READ_AHEAD_BYTES)
            _advise(fd, 0, ahead, os.POSIX_FADV_WILLNEED)
            self._opened.append((member[0], fd, st, ahead))
            self._bytes += ahead
        if not self._opened:
            raise StopIteration
        relative, fd, st, ahead = self._opened.popleft()
        self._bytes -= ahead
        return relative, fd, st

    def close(self) -> None:
        while self._opened:
            os.close(self._opened.popleft()[1])


class _Pipeline:
    """Fills buffers on the calling thread while one thread hashes and one writes them, and a
    third hashes the members whose filed checksum is known.

    hashlib and os.write release the GIL, so reading, hashing and writing overlap; each buffer
    returns to the pool once every consumer is done with it, which bounds memory. The bytes put
    into buffers are the command's progress: when reading, hashing or writing stops, the
    buffers run out and it stands still.
    """

    def __init__(self, out_fd: int, progress: Progress, check_members: bool = False) -> None:
        self.out_fd = out_fd
        self.progress = progress
        self.digest = hashlib.new(ALGORITHM)
        self.total = 0
        self._free: queue.Queue[bytearray] = queue.Queue()
        for _ in range(BUFFER_COUNT):
            self._free.put(bytearray(BUFFER_SIZE))
        self._hash_q: queue.Queue[tuple[bytearray, int] | None] = queue.Queue()
        self._write_q: queue.Queue[tuple[bytearray, int] | None] = queue.Queue()
        self._pending: dict[int, int] = {}
        self._lock = threading.Lock()
        self._errors: list[BaseException] = []
        self._behind = _WriteBehind(out_fd)
        self._threads = [
            threading.Thread(target=self._hash_loop, daemon=True),
            threading.Thread(target=self._write_loop, daemon=True),
        ]
        # Spans of member data in the current buffer: (check, start, end).
        self._spans: list[tuple[_MemberCheck, int, int]] = []
        self._member_q: queue.Queue[tuple[bytearray, list[tuple[_MemberCheck, int, int]]] | None]
        self._member_q = queue.Queue()
        if check_members:
            self._threads.append(threading.Thread(target=self._member_loop, daemon=True))
        for thread in self._threads:
            thread.start()
        self._buf = self._free.get()
        self._fill = 0

    def _release(self, buf: bytearray) -> None:
        with self._lock:
            self._pending[id(buf)] -= 1
            done = self._pending[id(buf)] == 0
        if done:
            self._free.put(buf)

    def _hash_loop(self) -> None:
        while (item := self._hash_q.get()) is not None:
            buf, n = item
            self.digest.update(memoryview(buf)[:n])
            self._release(buf)

    def _member_loop(self) -> None:
        while (item := self._member_q.get()) is not None:
            buf, spans = item
            view = memoryview(buf)
            for check, start, end in spans:
                check.hasher.update(view[start:end])
            self._release(buf)

    def _write_loop(self) -> None:
        while (item := self._write_q.get()) is not None:
            buf, n = item
            try:
                if not self._errors:
                    view = memoryview(buf)[:n]
                    while view:
                        view = view[os.write(self.out_fd, view) :]
                    self._behind.wrote(n)
            except BaseException as exc:  # reported by check(); keep draining
                self._errors.append(exc)
            self._release(buf)

    def check(self) -> None:
        if self._errors:
            raise self._errors[0]

    def _flush(self) -> None:
        if self._fill:
            spans, self._spans = self._spans, []
            with self._lock:
                self._pending[id(self._buf)] = 3 if spans else 2
            if spans:
                self._member_q.put((self._buf, spans))
            self._hash_q.put((self._buf, self._fill))
            self._write_q.put((self._buf, self._fill))
            self._buf = self._free.get()
            self._fill = 0
            self.check()

    def emit(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            k = min(len(view), BUFFER_SIZE - self._fill)
            self._buf[self._fill : self._fill + k] = view[:k]
            self._fill += k
            self.total += k
            self.progress.advance(k)
            view = view[k:]
            if self._fill == BUFFER_SIZE:
                self._flush()

    def copy_from(
        self,
        read_into: Callable[[memoryview], int],
        size: int,
        short: AgentError,
        check: _MemberCheck | None = None,
    ) -> None:
        """Copy exactly ``size`` bytes from a reader straight into the buffers; ``short`` is
        raised if the reader ends first. ``check`` also hashes these bytes on their own."""
        left = size
        while left:
            k = min(BUFFER_SIZE - self._fill, left)
            n = read_into(memoryview(self._buf)[self._fill : self._fill + k])
            if n == 0:
                raise short
            if check is not None:
                self._spans.append((check, self._fill, self._fill + n))
            self._fill += n
            self.total += n
            self.progress.advance(n)
            left -= n
            if self._fill == BUFFER_SIZE:
                self._flush()

    def finish(self) -> None:
        self._flush()
        self.close()
        self.check()

    def close(self) -> None:
        self._hash_q.put(None)
        self._write_q.put(None)
        self._member_q.put(None)
        for thread in self._threads:
            thread.join()


class _WriteBehind:
    """Keeps an archive being written from piling up in the page cache.

    Every CACHE_STEP bytes, writeback of the new bytes is started (POSIX_FADV_DONTNEED starts
    writeback of dirty pages and leaves them cached), and the pages more than CACHE_LAG bytes
    back, clean by then, are dropped. The final fsync has little left to do, and the kernel
    reuses the same few pages throughout. Nothing happens for a pipe or socket.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.enabled = stat.S_ISREG(os.fstat(fd).st_mode)
        self._written = self._started = 0

    def wrote(self, count: int) -> None:
        self._written += count
        if not self.enabled or self._written - self._started < CACHE_STEP:
            return
        _advise(self.fd, self._started, self._written - self._started, os.POSIX_FADV_DONTNEED)
        self._started = self._written
        if self._written > CACHE_LAG:  # from the start: pages still under writeback last time
            _advise(self.fd, 0, self._written - CACHE_LAG, os.POSIX_FADV_DONTNEED)


def _copy_member(
    pipe: _Pipeline, relative: str, fd: int, st: os.stat_result, check: _MemberCheck | None
) -> None:
    """A member's data into the archive, in steps after each of which its pages are dropped
    from the page cache (read once, they would only push out other data)."""
    _advise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    read = functools.partial(_readv, fd, relative)
    short = AgentError("source_file", f"source file {relative!r} shrank while read")
    done = 0
    while done < st.st_size:
        step = min(st.st_size - done, CACHE_STEP)
        pipe.copy_from(read, step, short, check)
        _advise(fd, done, step, os.POSIX_FADV_DONTNEED)
        done += step
    if os.fstat(fd).st_size != st.st_size:
        raise AgentError("source_file", f"source file {relative!r} changed while read")


def _readv(fd: int, relative: str, view: memoryview) -> int:
    try:
        return os.readv(fd, [view])
    except OSError as exc:
        raise _source_error(relative, exc) from None


def _advise(fd: int, offset: int, length: int, advice: int) -> None:
    """A hint to the kernel's page cache; where it is not supported nothing changes."""
    with contextlib.suppress(OSError):
        os.posix_fadvise(fd, offset, length, advice)


def _prefetch_headers(fd: int, members: list[tuple[str, int]]) -> None:
    """Ask the disk for the pages that hold the member headers, all of them at once and only
    those (the build did not keep the archive cached): read one by one, each header of a cold
    archive would wait for the disk on its own."""
    _advise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    offset = 0
    for name, size in members:
        header = _header_size(name)
        _advise(fd, offset, header, os.POSIX_FADV_WILLNEED)
        offset += header + _padded(size)


def _header(name: str, st: os.stat_result) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = st.st_size
    info.mtime = int(st.st_mtime)
    info.mode = stat.S_IMODE(st.st_mode)
    info.uid, info.gid = st.st_uid, st.st_gid
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info.tobuf(format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape")


def _header_size(name: str) -> int:
    raw = len(_encoded(name))
    if raw > tarfile.LENGTH_NAME:  # GNU ././@LongLink header plus the name and its NUL
        return 2 * BLOCK + (raw + 1 + BLOCK - 1) // BLOCK * BLOCK
    return BLOCK


def _encoded(name: str) -> bytes:
    return name.encode("utf-8", "surrogateescape")


def _padded(size: int) -> int:
    return (size + BLOCK - 1) // BLOCK * BLOCK


if __name__ == "__main__":
    sys.exit(main(sys.argv))
