"""Real OpenSSH servers for the tests: each one a separate "host" on its own loopback address.

Every server is ``/usr/sbin/sshd -D -e`` (foreground, our own child, stopped by PID) with a
generated host key, on a free port of an address such as 127.0.0.2, which ``is_same_host``
does not count as this machine, so everything sent there goes through SSH. Logging in as root
with a key needs root, which the test machines and CI are.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from ccat_packaging.plans import Endpoint
from ccat_packaging.resources import AssemblyHosts

SSHD = "/usr/sbin/sshd"

# For a file argument of ``SshLab.environment``: the lab's own.
LAB = "the lab's"

CONFIG = """\
Port {port}
ListenAddress {address}
HostKey {directory}/host_ed25519
PidFile none
AuthorizedKeysFile {directory}/authorized_keys
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
Subsystem sftp internal-sftp
LogLevel ERROR
MaxStartups 100:30:200
MaxSessions 50
"""


def keygen(path: Path, passphrase: str = "") -> str:
    """A new ed25519 key pair at ``path`` (and ``path``.pub); returns the public key line."""
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", passphrase, "-C", path.name, "-f", str(path)],
        check=True,
    )
    return path.with_suffix(".pub").read_text().strip()


def free_port(address: str) -> int:
    with socket.socket() as probe:
        probe.bind((address, 0))
        return int(probe.getsockname()[1])


@dataclass
class SshServer:
    address: str
    port: int
    directory: Path
    host_public_key: str
    process: subprocess.Popen[bytes]

    @property
    def known_hosts_line(self) -> str:
        """This host's line in a known-hosts file (ports other than 22 are written [addr]:port)."""
        name = self.address if self.port == 22 else f"[{self.address}]:{self.port}"
        return f"{name} {self.host_public_key}"

    def endpoint(self, root: Path, name: str = "remote", location_id: int = 1) -> Endpoint:
        return Endpoint(location_id, name, self.address, "root", self.port, str(root))

    def sshd_pids(self) -> list[int]:
        """The listener and every per-connection sshd under it (each of those is a session
        leader of its own, so a process group would not catch them)."""
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry))
        found, todo = [], [self.process.pid]
        while todo:
            pid = todo.pop()
            try:
                command = Path(f"/proc/{pid}/comm").read_text().strip()
            except OSError:
                continue
            if command == "sshd":
                found.append(pid)
                todo.extend(children.get(pid, []))
        return found

    def crash(self) -> None:
        """SIGKILL every sshd of this host, as a host or network failure would end them; the
        commands they started are left to notice that on their own."""
        for pid in self.sshd_pids():
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.crash()


@contextmanager
def running_sshd(
    address: str,
    directory: Path,
    authorized_keys: list[str],
    *,
    port: int | None = None,
    namespace: str | None = None,
) -> Iterator[SshServer]:
    """An sshd on ``address``: in this network namespace, or inside ``namespace`` (where
    ``address`` is one of that namespace's own)."""
    directory.mkdir(parents=True)
    directory.chmod(0o711)  # sshd reads authorized_keys as the user logging in
    host_public_key = keygen(directory / "host_ed25519")
    (directory / "authorized_keys").write_text("".join(f"{k}\n" for k in authorized_keys))
    (directory / "authorized_keys").chmod(0o644)
    port = port or free_port(address)
    config = directory / "sshd_config"
    config.write_text(CONFIG.format(port=port, address=address, directory=directory))
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation directory
    with open(directory / "sshd.log", "wb") as log:
        enter = ["ip", "netns", "exec", namespace] if namespace else []
        process = subprocess.Popen([*enter, SSHD, "-D", "-e", "-f", str(config)], stderr=log)
    server = SshServer(address, port, directory, host_public_key, process)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection((address, port), timeout=0.2).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"sshd on {address}:{port} did not start: "
                        + (directory / "sshd.log").read_text()
                    ) from None
                time.sleep(0.01)
        yield server
    finally:
        server.stop()


@dataclass
class SshLab:
    """Two SSH "hosts" (``a``, ``b``), a client key both accept, and a known-hosts file."""

    directory: Path
    a: SshServer
    b: SshServer
    client_key: Path
    known_hosts: Path

    def environment(
        self,
        key_filename: str = LAB,
        known_hosts: str | None = LAB,
        trust_unknown_hosts: bool = False,
        remote_dir: str | None = None,
    ) -> dict[str, str | None]:
        """The ``CCAT_SSH_*`` settings that reach the lab, as a deployment sets them: its key
        and known-hosts file unless others are given; None leaves a variable unset, so that
        its default applies."""
        return {
            "CCAT_SSH_KEY_FILE": str(self.client_key) if key_filename == LAB else key_filename,
            "CCAT_SSH_KNOWN_HOSTS": str(self.known_hosts) if known_hosts == LAB else known_hosts,
            "CCAT_SSH_TRUST_UNKNOWN_HOSTS": "1" if trust_unknown_hosts else "0",
            "CCAT_SSH_CONNECT_TIMEOUT_SECONDS": "5",
            "CCAT_SSH_REMOTE_DIR": remote_dir,
        }


# What the ``make_hosts`` fixture (ssh_fixtures) gives: ``AssemblyHosts`` in the environment
# ``SshLab.environment`` makes of the same arguments, closed after the test.
MakeHosts = Callable[..., AssemblyHosts]
