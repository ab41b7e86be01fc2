"""Assembly on another host over SSH: Fabric 3 for the connection, one channel per command.

One connection per (user, host, port) per run, opened on first use and verified against a
known-hosts file that only this user (or root) can change; with ``trust_unknown_hosts`` a new
host's key is recorded there, so each host is trusted on its first use only. The agent
(``tar_agent.py``, standard library only) is uploaded once by SFTP to a path named after its
content, in a directory only the login user (or root) can write, and each command runs it on its
own channel as ``exec PYTHON -I -S -c BOOTSTRAP SHA256 AGENT COMMAND - EVERY``: the bootstrap
reads the agent file, and runs the bytes it read only if they have the agent's SHA256, so what
runs is our agent whoever changed the file since. A command line of constants, so no file name
ever reaches a shell and no line can grow past the kernel's argument limit. The spec is the first
line on the channel's stdin, written with paramiko directly (Fabric's ``in_stream`` feeds
~100 B/s and mangles non-UTF-8 bytes), and stdin then stays open until the result is in: when
the connection drops or the worker gives up, sshd closes it and the agent stops and removes its
temporary file, whereas a Fabric command timeout would leave it running.

The worker gives up on a command that moved no bytes for ``stall_seconds``: every wait on the
channel is bounded by that, and the agent keeps it busy while it moves bytes, with the archive
itself (``send``, ``receive``) or with a progress line every EVERY = ``stall_seconds`` / 4.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import functools
import getpass
import hashlib
import io
import json
import logging
import os
import posixpath
import shlex
import stat
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import paramiko
from fabric import Config, Connection

from ccat_packaging.assembly import tar_agent
from ccat_packaging.assembly.hosts import (
    AgentProcess,
    HostRunner,
    Hosts,
    Meter,
    agent_error,
    describe,
)
from ccat_packaging.errors import (
    AuthenticationFailedError,
    ConfigurationError,
    ConnectionDroppedError,
    HostKeyError,
    HostUnreachableError,
    PackagingError,
    StalledError,
)
from ccat_packaging.plans import Endpoint

_CTR_CIPHERS = ["aes128-ctr", "aes192-ctr", "aes256-ctr"]

# Errors paramiko and the socket layer raise when a connection cannot be made or breaks.
_NETWORK_ERRORS = (OSError, paramiko.SSHException, EOFError)

# The known-hosts file when none is configured: verified against, and written when trusting.
_DEFAULT_KNOWN_HOSTS = "~/.ssh/known_hosts"

# Run remotely as ``python3 -I -S -c _BOOTSTRAP SHA256 AGENT COMMAND ...``: the bytes hashed are
# the bytes run, so a file changed after its upload is refused rather than run (Python 3.8).
_BOOTSTRAP = (
    "import hashlib,sys\n"
    "h,p=sys.argv[1:3]\n"
    "with open(p,'rb') as f:b=f.read()\n"
    "if hashlib.sha256(b).hexdigest()!=h:"
    "sys.exit(p+' is not the tar agent of sha256 '+h+' (changed since its upload); not run')\n"
    "sys.argv=sys.argv[2:]\n"
    "exec(compile(b,p,'exec'))\n"
)

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SshSettings:
    """How to reach remote hosts; ``settings.py`` says what each field means (its
    ``CCAT_SSH_*`` variables, and ``CCAT_STALL_SECONDS`` for ``stall_seconds``). The
    passphrase is left out of the repr, which logs and tracebacks show."""

    stall_seconds: float
    key_filename: str | None
    key_passphrase: str | None = field(repr=False)
    known_hosts: str | None
    trust_unknown_hosts: bool
    connect_timeout: int
    remote_python: str
    remote_dir: str
    keepalive_seconds: int = 30


def fingerprint(key: paramiko.PKey) -> str:
    """The key's SHA256 fingerprint as ``ssh-keygen -l`` prints it."""
    digest = base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")
    return f"{key.get_name()} SHA256:{digest}"


class _RefuseUnknownHostKey(paramiko.MissingHostKeyPolicy):
    def __init__(self, known_hosts: str, where: str) -> None:
        self._known_hosts = known_hosts
        self._where = where

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: Any) -> None:
        raise HostKeyError(
            f"{self._where}: host {hostname} offered {fingerprint(key)}, which is not in the "
            f"known hosts file {self._known_hosts}; refusing to connect. Add the host's key "
            "there (ssh-keyscan, checked against the host), or set "
            "CCAT_SSH_TRUST_UNKNOWN_HOSTS=1 to pin it on first use"
        )


class _RecordNewHostKey(paramiko.MissingHostKeyPolicy):
    """Trust a host not yet known, and pin its key in the known-hosts file for every later
    connection, from any process."""

    def __init__(self, known_hosts: str, where: str) -> None:
        self._known_hosts = known_hosts
        self._where = where

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: Any) -> None:
        try:
            _record_host_key(self._known_hosts, hostname, key, self._where)
        except OSError as exc:
            raise ConfigurationError(
                f"{self._where}: cannot record the key of host {hostname} in the known hosts "
                f"file {self._known_hosts}: {exc}"
            ) from None
        client.get_host_keys().add(hostname, key.get_name(), key)


def _record_host_key(known_hosts: str, hostname: str, key: paramiko.PKey, where: str) -> None:
    """Add ``hostname``'s key to the file by writing a new one and renaming it over the old
    (readers see the old or the new file, never half of one), under a lock of its directory so
    that concurrent workers lose no record. Lines paramiko cannot parse are kept as they are."""
    path = os.path.realpath(known_hosts)
    directory = os.path.dirname(path)
    directory_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(directory_fd, fcntl.LOCK_EX)
        recorded = paramiko.HostKeys(path).lookup(hostname)
        if recorded:  # another worker trusted this host meanwhile: its key, or none
            if key in recorded.values():
                return
            raise HostKeyError(
                f"{where}: host {hostname} offered {fingerprint(key)}, but the known hosts "
                f"file {known_hosts} has just received another key for it; refusing to connect"
            )
        old = Path(path).read_bytes()
        line = f"{hostname} {key.get_name()} {key.get_base64()}\n".encode()
        temporary = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(old + (b"\n" if old and not old.endswith(b"\n") else b"") + line)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
            raise
        os.fsync(directory_fd)
    finally:
        os.close(directory_fd)


class _Attributes(Protocol):
    """What ``os.lstat`` and paramiko's ``SFTPClient.lstat`` both answer."""

    @property
    def st_mode(self) -> int: ...

    @property
    def st_uid(self) -> int: ...


def _writable_by_others(attributes: _Attributes, owners: set[int], sticky_ok: bool) -> str:
    """Why someone outside ``owners`` could change what is there; empty if no one can. In a
    sticky directory (``/tmp``) others cannot rename or remove what they do not own."""
    mode = attributes.st_mode
    described = f"mode {stat.S_IMODE(mode):04o}, owner uid {attributes.st_uid}"
    if attributes.st_uid not in owners:
        return f"it is owned by another user ({described})"
    if mode & 0o022 and not (sticky_ok and mode & stat.S_ISVTX):
        return f"its group or others can write it ({described})"
    return ""


def _unsafe_directories(
    directory: str, lstat: Callable[[str], _Attributes], owners: set[int]
) -> str:
    """Why someone outside ``owners`` could change what is in ``directory`` (an absolute path
    without symlinks): through it or any directory above it; empty if no one can."""
    parts = [part for part in directory.split("/") if part]
    for depth in range(len(parts) + 1):
        path = "/" + "/".join(parts[:depth])
        problem = _writable_by_others(lstat(path), owners, sticky_ok=depth < len(parts))
        if problem:
            return f"{path}: {problem}"
    return ""


def _check_private_known_hosts(path: str, where: str) -> None:
    """Refuse a known-hosts file that others could change: whoever can, can make us trust a
    host of theirs."""
    real = os.path.realpath(path)
    owners = {os.geteuid(), 0}
    problem = _unsafe_directories(os.path.dirname(real), os.lstat, owners)
    if not problem:
        attributes = os.lstat(real)
        if not stat.S_ISREG(attributes.st_mode):
            problem = f"{real}: it is not a regular file"
        elif mine := _writable_by_others(attributes, owners, sticky_ok=False):
            problem = f"{real}: {mine}"
    if problem:
        raise ConfigurationError(
            f"{where}: the known hosts file {path} could be changed by others ({problem}); "
            "refusing to trust it. Make it and the directories above it owned by this user "
            "(or root) and writable by no one else (chmod go-w)"
        )


@functools.cache
def _agent_source() -> bytes:
    return Path(tar_agent.__file__).read_bytes()


@functools.cache
def _agent_digest() -> str:
    return hashlib.sha256(_agent_source()).hexdigest()


class SshHosts:
    """The SSH connections of one run, one per (user, host, port), shared by all its steps."""

    def __init__(self, settings: SshSettings, meter: Meter) -> None:
        self.settings = settings
        self._meter = meter
        self._sessions: dict[tuple[str, str, int], _Session] = {}

    def runner(self, endpoint: Endpoint, hosts: Hosts) -> SshRunner:
        user = endpoint.user or getpass.getuser()
        key = (user, endpoint.host.lower(), endpoint.port)
        if key not in self._sessions:
            self._sessions[key] = _Session(user, endpoint.host, endpoint.port, self.settings)
        return SshRunner(self._sessions[key], endpoint, hosts, self._meter)

    def close(self) -> None:
        for session in self._sessions.values():
            session.close()
        self._sessions.clear()


class SshRunner:
    """Runs agent commands for one location on its host, over the run's connection there."""

    via_ssh = True

    def __init__(self, session: _Session, endpoint: Endpoint, hosts: Hosts, meter: Meter) -> None:
        self.machine = session.name
        self._session = session
        self._hosts = hosts
        self._meter = meter
        self._where = describe(endpoint)

    def runner_for(self, endpoint: Endpoint) -> HostRunner:
        return self._hosts.runner_for(endpoint)

    def run(self, command: str, spec: Mapping[str, Any]) -> dict[str, Any]:
        return self.start(command, spec).wait()

    def start(self, command: str, spec: Mapping[str, Any]) -> AgentProcess:
        channel = self._session.start_agent(command, self._where)
        process = _ChannelProcess(
            channel, command, self._where, self._session.settings, self._meter
        )
        process.send_spec(spec)
        return process


class _Session:
    """One host's connection, opened (again) on demand, and where its agent copy lives."""

    def __init__(self, user: str, host: str, port: int, settings: SshSettings) -> None:
        self.user, self.host, self.port = user, host, port
        self.name = f"{user}@{host}:{port}"
        self.settings = settings
        self._connection: Connection | None = None
        self._agent_path: str | None = None

    def start_agent(self, command: str, where: str) -> paramiko.Channel:
        """A channel running the agent's ``command``, waiting for its spec on stdin."""
        connection = self._connect(where)
        try:
            if self._agent_path is None:
                self._agent_path = self._install_agent(connection, where)
            python = self.settings.remote_python
            argv = [python, "-I", "-S", "-c", _BOOTSTRAP, _agent_digest(), self._agent_path]
            argv += [command, "-"]
            if tar_agent.COMMANDS[command].stream != "out":  # else the archive is the progress
                argv.append(f"{self.settings.stall_seconds / 4:g}")
            channel = connection.transport.open_session(timeout=self.settings.connect_timeout)
            channel.settimeout(self.settings.stall_seconds)
            channel.exec_command("exec " + shlex.join(argv))
        except PermissionError as exc:
            raise ConfigurationError(
                f"{where}: cannot install the tar agent under {self.settings.remote_dir!r} "
                f"in the home of {self.user}: {exc}"
            ) from None
        except _NETWORK_ERRORS as exc:
            self.close()
            raise ConnectionDroppedError(
                f"{where}: the connection broke while starting {command}: "
                f"{type(exc).__name__}: {exc}"
            ) from None
        return channel

    def _connect(self, where: str) -> Connection:
        if self._connection is not None and self._connection.is_connected:
            return self._connection
        self.close()
        settings = self.settings
        connect_kwargs: dict[str, Any] = {
            "banner_timeout": settings.connect_timeout,
            "auth_timeout": settings.connect_timeout,
            # paramiko prefers AES-CTR, whose separate MAC costs ~40 % of streaming throughput;
            # without it, AES-GCM is chosen (CBC remains for servers that lack GCM).
            "disabled_algorithms": {"ciphers": _CTR_CIPHERS},
        }
        if settings.key_filename:
            # Only the configured key: no agent, no ~/.ssh keys tried behind our back.
            connect_kwargs.update(pkey=self._key(where), look_for_keys=False, allow_agent=False)
        connection = Connection(
            self.host,
            user=self.user,
            port=self.port,
            # Fabric's defaults and nothing else: ``lazy`` skips its system and user config
            # files (/etc/fabric.*, ~/.fabric.*: a .py one is executed, and any could add a
            # gateway, agent forwarding or keys), the empty SSHConfig any ssh_config file.
            config=Config(lazy=True, ssh_config=paramiko.SSHConfig()),
            connect_timeout=settings.connect_timeout,
            connect_kwargs=connect_kwargs,
        )
        try:
            self._check_host_keys(connection.client, where)
            connection.open()
            connection.transport.set_keepalive(settings.keepalive_seconds)
            _rekey_like_openssh(connection.transport)
        except paramiko.BadHostKeyException as exc:
            _discard(connection)
            raise HostKeyError(
                f"{where}: host {self.host}:{self.port} offered {fingerprint(exc.key)}, but the "
                f"known hosts file has {fingerprint(exc.expected_key)}; refusing to connect. If "
                "the host's key was changed on purpose, update the known hosts file"
            ) from None
        except paramiko.AuthenticationException as exc:
            _discard(connection)
            raise AuthenticationFailedError(
                f"{where}: {self.user} could not log in with the configured key: {exc}"
            ) from None
        except PackagingError:
            _discard(connection)
            raise
        except _NETWORK_ERRORS as exc:
            _discard(connection)
            raise HostUnreachableError(
                f"{where}: cannot connect to {self.host}:{self.port}: {type(exc).__name__}: {exc}",
                host=self.host,
            ) from None
        self._connection = connection
        return connection

    def _key(self, where: str) -> paramiko.PKey:
        """The configured private key, read here so that a missing file or a wrong passphrase
        is reported as such rather than as a connection failure."""
        path = str(self.settings.key_filename)
        passphrase = self.settings.key_passphrase
        try:  # positional: the argument's name changed in paramiko 5
            return paramiko.PKey.from_path(path, passphrase.encode() if passphrase else None)
        except (OSError, paramiko.SSHException, ValueError) as exc:
            raise ConfigurationError(
                f"{where}: cannot load the SSH key file {path}: {type(exc).__name__}: {exc}"
            ) from None

    def _check_host_keys(self, client: paramiko.SSHClient, where: str) -> None:
        """Fabric accepts any host key by default; here only those in a known-hosts file that
        no one else can change pass, unless the deployment opted into trusting new hosts: their
        keys are then recorded in that file (the default one too), so that each host is trusted
        on its first use only. A changed key is refused regardless."""
        path = os.path.expanduser(self.settings.known_hosts or _DEFAULT_KNOWN_HOSTS)
        trust = self.settings.trust_unknown_hosts
        if not os.path.exists(path):
            if not trust:
                raise ConfigurationError(f"{where}: known hosts file {path} does not exist")
            os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
            Path(path).touch(mode=0o600)
        _check_private_known_hosts(path, where)
        client.load_host_keys(path)
        policy = _RecordNewHostKey if trust else _RefuseUnknownHostKey
        client.set_missing_host_key_policy(policy(path, where))

    def _install_agent(self, connection: Connection, where: str) -> str:
        """The agent's path on the host, in a directory that only the login user (or root)
        can write, so that no one else can put a file there under its name; uploaded unless
        this exact agent is there already. A file there of that name with other content is
        replaced, and the rename makes a half-uploaded copy impossible to run."""
        sftp = connection.sftp()
        home = sftp.normalize(".")
        _sftp_makedirs(sftp, posixpath.join(home, self.settings.remote_dir))
        directory = sftp.normalize(posixpath.join(home, self.settings.remote_dir))
        # The login user is whoever owns its home: SFTP has no other way to say who we are.
        problem = _unsafe_directories(directory, sftp.lstat, {sftp.stat(home).st_uid, 0})
        if problem:
            raise ConfigurationError(
                f"{where}: the agent directory {directory} could be changed by others than "
                f"{self.user} ({problem}); refusing to run the agent from there. Make it and "
                f"the directories above it owned by {self.user} (or root) and writable by no "
                "one else (chmod go-w), or set remote_dir elsewhere"
            )
        path = posixpath.join(directory, f"tar_agent-{_agent_digest()[:16]}.py")
        found = _other_than_agent(sftp, path)
        if found is None:
            return path
        partial = f"{path}.{uuid.uuid4().hex}.partial"
        sftp.putfo(io.BytesIO(_agent_source()), partial)
        sftp.chmod(partial, 0o600)  # not left to the host's umask
        sftp.posix_rename(partial, path)
        if found:
            _log.warning("%s: %s was not the tar agent (%s); replaced it", where, path, found)
        return path

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


def _rekey_like_openssh(transport: paramiko.Transport) -> None:
    """Leave re-keying to the server (OpenSSH's sshd re-keys every 1 to 4 GB by default)
    instead of paramiko's own every 512 MiB. paramiko answers a channel closing during a key
    exchange from its transport thread, which then waits for that same exchange to end:
    deadlocked for 30 s, then the connection dies. An agent finishing its stream just after
    paramiko began a re-key hit that (a 1 GiB package ends right at the second one); what
    remains, a server's re-key overlapping a close, is rarer and fails as retryable."""
    transport.packetizer.REKEY_BYTES = transport.packetizer.REKEY_PACKETS = 1 << 36


def _discard(connection: Connection) -> None:
    """Close a connection whose opening failed: Fabric's ``close`` skips those, which would
    leave paramiko's transport (socket and thread) behind."""
    connection.client.close()
    connection.close()


def _other_than_agent(sftp: paramiko.SFTPClient, path: str) -> str | None:
    """What is at ``path`` instead of this agent in a file only its owner can write: empty
    for nothing, None if it is the agent."""
    try:
        attributes = sftp.lstat(path)
    except FileNotFoundError:
        return ""
    mode = attributes.st_mode
    if not stat.S_ISREG(mode) or mode & 0o022:
        return f"not a regular file only its owner can write: mode {mode:06o}"
    with sftp.open(path, "rb") as handle:
        handle.prefetch(attributes.st_size)
        digest = hashlib.sha256(handle.read()).hexdigest()
    return None if digest == _agent_digest() else f"sha256 {digest}, not {_agent_digest()}"


def _sftp_makedirs(sftp: paramiko.SFTPClient, path: str) -> None:
    current = ""
    for part in path.strip("/").split("/"):
        current += "/" + part
        try:
            sftp.stat(current)
        except FileNotFoundError:
            try:
                sftp.mkdir(current, 0o700)
            except OSError:
                sftp.stat(current)  # another worker made it meanwhile; else this raises


class _ChannelProcess:
    """An agent command on an SSH channel: archive bytes on stdout/stdin, result line at the end.

    ``moved`` is as far as the command is known to have come: the archive bytes through the
    channel, or the agent's progress lines; the run's meter hears of every advance."""

    def __init__(
        self,
        channel: paramiko.Channel,
        command: str,
        where: str,
        settings: SshSettings,
        meter: Meter,
    ) -> None:
        self._channel = channel
        self._command = command
        self._where = where
        self._stall_seconds = settings.stall_seconds
        self._remote_python = settings.remote_python
        self._meter = meter
        self.moved = 0

    def _broken(self, exc: BaseException) -> PackagingError:
        self.abort()
        if isinstance(exc, TimeoutError):
            return StalledError(
                self._where,
                self._command,
                self._stall_seconds,
                self.moved,
                "the channel was closed, which stops the agent",
            )
        return ConnectionDroppedError(
            f"{self._where}: the connection dropped during {self._command}: "
            f"{type(exc).__name__}: {exc}"
        )

    def _advanced(self, moved: int) -> None:
        if moved > self.moved:
            self._meter.add(moved - self.moved)
            self.moved = moved

    def send_spec(self, spec: Mapping[str, Any]) -> None:
        try:
            self._channel.sendall(json.dumps(spec).encode("ascii") + b"\n")
        except _NETWORK_ERRORS as exc:
            raise self._broken(exc) from None

    def read(self, size: int) -> bytes:
        try:
            data = bytes(self._channel.recv(size))
        except _NETWORK_ERRORS as exc:
            raise self._broken(exc) from None
        self._advanced(self.moved + len(data))
        return data

    def write(self, data: bytes) -> None:
        try:
            self._channel.sendall(data)
        except _NETWORK_ERRORS as exc:
            raise self._broken(exc) from None
        self._advanced(self.moved + len(data))

    def close_input(self) -> None:
        try:
            self._channel.shutdown_write()
        except _NETWORK_ERRORS as exc:
            raise self._broken(exc) from None

    def wait(self) -> dict[str, Any]:
        try:
            out = self._drain(self._channel.recv, progress_lines=self._command != "send")
            err = self._drain(self._channel.recv_stderr, progress_lines=False)
            if not self._channel.status_event.wait(self._stall_seconds):
                raise TimeoutError()
            status = self._channel.recv_exit_status()
        except _NETWORK_ERRORS as exc:
            raise self._broken(exc) from None
        finally:
            self.abort()
        result = _result_line(err if self._command == "send" else out)
        if result is not None and "ok" in result:
            return dict(result["ok"])
        if result is not None and "error" in result:
            error = result["error"]
            raise agent_error(str(error["kind"]), str(error["message"]), self._where)
        stderr = err.decode("utf-8", "replace").strip()[-2000:]
        if status == -1:
            raise ConnectionDroppedError(
                f"{self._where}: the connection dropped during {self._command}"
            )
        if status in (126, 127):
            raise ConfigurationError(
                f"{self._where}: cannot run {self._remote_python} (exit {status}): {stderr}"
            )
        raise PackagingError(
            f"{self._where}: the agent ({self._command}) exited with status {status} "
            f"without a result: {stderr or 'no output'}"
        )

    def abort(self) -> None:
        with contextlib.suppress(*_NETWORK_ERRORS):  # closing a dead channel raises EOFError
            self._channel.close()

    def _drain(self, recv: Any, progress_lines: bool) -> bytes:
        """Everything until the stream ends; with ``progress_lines``, each complete
        ``{"progress": N}`` line also advances ``moved`` as it arrives."""
        data = bytearray()
        parsed = 0
        while chunk := recv(1 << 16):
            data += chunk
            if progress_lines:
                end = data.rfind(b"\n") + 1
                for line in bytes(data[parsed:end]).splitlines():
                    self._advanced(_progress(line))
                parsed = max(parsed, end)
        return bytes(data)


def _progress(line: bytes) -> int:
    """The byte count of an agent's progress line; 0 for any other line."""
    try:
        parsed = json.loads(line)
    except ValueError:
        return 0
    return int(parsed["progress"]) if isinstance(parsed, dict) and "progress" in parsed else 0


def _result_line(output: bytes) -> dict[str, Any] | None:
    """The agent's JSON result: its last line (login files may print before it)."""
    for line in reversed(output.splitlines()):
        try:
            parsed = json.loads(line)
        except ValueError:
            continue
        if isinstance(parsed, dict) and ("ok" in parsed or "error" in parsed):
            return parsed
    return None
