"""The observatory on one machine: real hosts made of network namespaces and veth links.

Site ``telescope``: two instrument computers (``instr1``, ``instr2``) and the buffer host
(``buffer``), each a namespace with its own sshd on port 22, joined by a bridge in a switch
namespace that also routes the site's uplink. The central site is the root namespace: PostgreSQL,
the broker, ``dagster-daemon`` and ``dagster-webserver``. Those listen on loopback only, so a relay
on the uplink's central address forwards each of their ports to loopback, the way a site reaches
central services through one gateway::

    instr1 10.N.1.11 ─┐
    instr2 10.N.1.12 ─┼─ switch (bridge 10.N.1.1) ── uplink ── central 10.N.0.1 (root namespace)
    buffer 10.N.1.10 ─┘

No namespace has a route anywhere else: the hosts reach each other and the central address, and
nothing beyond. Every interface's byte counters are read with ``ip -s -j link``, which is how the
tests prove which links the package bytes crossed.

``make topology-up`` and ``make topology-down`` (``topology_up.py``)
brings the same topology up for a person, with the whole deployment on it.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ccat_packaging_tests.deployment import (
    REPO,
    free_port,
    start_in_own_session,
    stop_group,
    wait_for,
)
from ccat_packaging_tests.sshd import SshServer, keygen, running_sshd

SITE = "telescope"
HOSTS = {"buffer": 10, "instr1": 11, "instr2": 12}


@dataclass(frozen=True)
class Host:
    name: str
    namespace: str
    address: str

    def command(self, *argv: str) -> list[str]:
        """``argv`` run on this host."""
        return ["ip", "netns", "exec", self.namespace, *argv]


@dataclass(frozen=True)
class LinkBytes:
    received: int
    sent: int

    def __sub__(self, earlier: LinkBytes) -> LinkBytes:
        return LinkBytes(self.received - earlier.received, self.sent - earlier.sent)


def _ip(*argv: str) -> str:
    done = subprocess.run(["ip", *argv], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(argv)} failed: {done.stderr.strip()}")
    return done.stdout


@dataclass
class Network:
    """The namespaces and links; ``prefix`` keeps two topologies on one machine apart (names
    stay within the kernel's 15 characters) and ``net`` is the second octet of all addresses."""

    prefix: str
    net: int

    @property
    def central(self) -> str:
        return f"10.{self.net}.0.1"

    @property
    def uplink(self) -> str:
        """The uplink's interface in the root namespace."""
        return f"{self.prefix}up"

    @property
    def switch(self) -> str:
        return f"{self.prefix}_sw"

    @property
    def hosts(self) -> dict[str, Host]:
        return {
            name: Host(name, f"{self.prefix}_{name}", f"10.{self.net}.1.{last}")
            for name, last in HOSTS.items()
        }

    def create(self) -> None:
        self.destroy()  # what a crashed earlier run left behind
        sw = self.switch
        _ip("netns", "add", sw)
        _ip("-n", sw, "link", "set", "lo", "up")
        _ip("link", "add", self.uplink, "type", "veth", "peer", "name", "wan", "netns", sw)
        _ip("addr", "add", f"{self.central}/30", "dev", self.uplink)
        _ip("link", "set", self.uplink, "up")
        _ip("-n", sw, "addr", "add", f"10.{self.net}.0.2/30", "dev", "wan")
        _ip("-n", sw, "link", "set", "dev", "wan", "up")
        _ip("-n", sw, "link", "add", "br0", "type", "bridge")
        _ip("-n", sw, "addr", "add", f"10.{self.net}.1.1/24", "dev", "br0")
        _ip("-n", sw, "link", "set", "br0", "up")
        subprocess.run(
            ["ip", "netns", "exec", sw, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1"], check=True
        )
        _ip("route", "add", f"10.{self.net}.1.0/24", "via", f"10.{self.net}.0.2")
        for host in self.hosts.values():
            _ip("netns", "add", host.namespace)
            _ip("-n", host.namespace, "link", "set", "lo", "up")
            port = f"p_{host.name}"
            _ip(
                "link",
                "add",
                "eth0",
                "netns",
                host.namespace,
                "type",
                "veth",
                "peer",
                "name",
                port,
                "netns",
                sw,
            )
            _ip("-n", sw, "link", "set", port, "master", "br0", "up")
            _ip("-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", "eth0")
            _ip("-n", host.namespace, "link", "set", "eth0", "up")
            _ip(
                "-n",
                host.namespace,
                "route",
                "add",
                f"10.{self.net}.0.0/30",
                "via",
                f"10.{self.net}.1.1",
            )

    def destroy(self) -> None:
        """Remove every namespace and link of this prefix (deleting a namespace deletes its
        ends of the veth pairs); safe to call when nothing exists."""
        existing = _ip("netns", "list").split()
        failed = []
        for namespace in [self.switch, *(h.namespace for h in self.hosts.values())]:
            if namespace in existing:
                try:
                    _ip("netns", "del", namespace)
                except RuntimeError as exc:  # go on with the others, then say so
                    failed.append(str(exc))
        with contextlib.suppress(RuntimeError):  # gone with the switch's namespace, usually
            _ip("link", "del", self.uplink)
        if failed:
            raise RuntimeError("; ".join(failed))

    def link_bytes(self) -> dict[str, LinkBytes]:
        """Bytes received and sent so far by each host's interface and by the uplink's
        central end."""
        counters = {"uplink": _counters([], self.uplink)}
        for host in self.hosts.values():
            counters[host.name] = _counters(["-n", host.namespace], "eth0")
        return counters

    def set_uplink(self, up: bool) -> None:
        """Cut the uplink (packets are lost, as on a broken line) or mend it; a link that goes
        down takes its routes along, so mending puts the site's route back."""
        _ip("link", "set", self.uplink, "up" if up else "down")
        if up:
            _ip("route", "replace", f"10.{self.net}.1.0/24", "via", f"10.{self.net}.0.2")

    def shape(self, host: str, mbit: int | None) -> None:
        """Limit what ``host`` sends to ``mbit`` Mbit/s with a token bucket, or lift the limit;
        ``uplink`` limits both directions of the uplink."""
        if host == "uplink":
            ends = [(["tc"], self.uplink), (["ip", "netns", "exec", self.switch, "tc"], "wan")]
        else:
            ends = [(self.hosts[host].command("tc"), "eth0")]
        for tc, device in ends:
            if mbit is None:
                # fails harmlessly when nothing is shaped
                subprocess.run([*tc, "qdisc", "del", "dev", device, "root"], capture_output=True)
                continue
            bucket = ["tbf", "rate", f"{mbit}mbit", "burst", "256kb", "latency", "200ms"]
            subprocess.run([*tc, "qdisc", "replace", "dev", device, "root", *bucket], check=True)


def _counters(namespace: list[str], device: str) -> LinkBytes:
    [link] = json.loads(_ip(*namespace, "-s", "-j", "link", "show", "dev", device))
    stats = link["stats64"]
    return LinkBytes(int(stats["rx"]["bytes"]), int(stats["tx"]["bytes"]))


class Relay:
    """Forwards TCP connections from ``listen`` to ``target``: a central service on loopback
    made reachable at the uplink's central address."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int]) -> None:
        self._target = target
        self._server = socket.create_server(listen, reuse_port=False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._server, selectors.EVENT_READ)
        self._peers: dict[socket.socket, socket.socket] = {}
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name=f"relay-{listen}", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._closing:
            for key, _ in self._selector.select(timeout=0.2):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock is self._server:
                    self._accept()
                elif sock in self._peers:  # not closed earlier in this round
                    self._pass_on(sock)

    def _accept(self) -> None:
        client, _ = self._server.accept()
        try:
            service = socket.create_connection(self._target, timeout=5)
        except OSError:
            client.close()
            return
        for one, other in ((client, service), (service, client)):
            one.setblocking(True)
            self._peers[one] = other
            self._selector.register(one, selectors.EVENT_READ)

    def _pass_on(self, sock: socket.socket) -> None:
        other = self._peers[sock]
        try:
            data = sock.recv(1 << 16)
            if data:
                other.sendall(data)
                return
        except OSError:
            pass
        for one in (sock, other):
            if one in self._peers:
                self._selector.unregister(one)
                del self._peers[one]
                one.close()

    def close(self) -> None:
        self._closing = True
        self._thread.join()  # the loop looks at _closing at least every 0.2 s
        for sock in [self._server, *self._peers]:
            sock.close()
        self._selector.close()


@dataclass
class Broker:
    """A RabbitMQ node of our own on loopback, so a test may restart it without disturbing
    anybody else's broker."""

    directory: Path
    port: int
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    @property
    def url(self) -> str:
        return f"pyamqp://guest:guest@127.0.0.1:{self.port}//"

    def start(self) -> None:
        (self.directory / "log").mkdir(parents=True, exist_ok=True)
        (self.directory / "plugins").write_text("[].\n")
        (self.directory / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\n"
        )
        env = {
            **os.environ,
            "HOME": str(self.directory),  # its own Erlang cookie
            "RABBITMQ_NODENAME": f"ccat{self.port}@localhost",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(free_port()),
            "RABBITMQ_MNESIA_BASE": str(self.directory / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.directory / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.directory / "plugins"),
            "RABBITMQ_CONFIG_FILE": str(self.directory / "rabbitmq"),
        }
        self.process = start_in_own_session(
            ["/usr/lib/rabbitmq/bin/rabbitmq-server"],
            env,
            self.directory / "broker.log",
            cwd=self.directory,  # where a crash dump lands
        )
        wait_for_port(("127.0.0.1", self.port), 60, self.process, self.directory / "broker.log")

    def stop(self) -> None:
        if self.process is not None:
            stop_group(self.process)
            self.process = None


def wait_for_port(
    address: tuple[str, int], timeout: float, process: subprocess.Popen[bytes], log: Path
) -> None:
    def listening() -> bool:
        if process.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"exited before listening on {address[0]}:{address[1]}:\n{tail}")
        with contextlib.suppress(OSError):
            socket.create_connection(address, timeout=0.5).close()
            return True
        return False

    wait_for(f"a listener on {address[0]}:{address[1]}", listening, timeout, every=0.2)


@contextlib.contextmanager
def relays(network: Network, ports: dict[int, int]) -> Iterator[None]:
    """For each (central port: loopback port) a relay on the uplink's central address."""
    with contextlib.ExitStack() as stack:
        for port, loop in ports.items():
            stack.callback(Relay((network.central, port), ("127.0.0.1", loop)).close)
        yield


@contextlib.contextmanager
def network_up(prefix: str, net: int) -> Iterator[Network]:
    network = Network(prefix, net)
    try:
        network.create()
        yield network
    finally:
        network.destroy()


@dataclass
class Worker:
    """A Celery run worker on a host, in a process group of its own."""

    process: subprocess.Popen[bytes]
    log: Path
    offset: int  # where this start's lines begin in a log shared with earlier starts

    def wait_ready(self, timeout: float = 90) -> None:
        def ready() -> bool:
            with open(self.log, "rb") as log:
                log.seek(self.offset)
                written = log.read()
            if self.process.poll() is not None:
                raise RuntimeError(f"the worker exited:\n{written.decode(errors='replace')}")
            return b" ready." in written

        wait_for("the worker to be ready", ready, timeout, every=0.3)

    def kill(self) -> None:
        """SIGKILL the worker and every process it started, as a crash of its host would."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        stop_group(self.process)


@dataclass
class Observatory:
    """The running topology: network, broker, relays and one sshd per site host."""

    directory: Path
    network: Network
    broker: Broker
    servers: dict[str, SshServer]
    client_key: Path
    known_hosts: Path

    def disk(self, host: str) -> Path:
        """The directory that stands for ``host``'s disk (all namespaces share one file
        system; which host "holds" a directory is what its location row says)."""
        path = self.directory / "disks" / host
        path.mkdir(parents=True, exist_ok=True)
        return path

    def central_env(
        self, dagster_pg: dict[str, str], ops_db_url: str, dagster_home: Path
    ) -> dict[str, str]:
        """The environment of the central processes (daemon, webserver) and of this test."""
        db = dagster_pg
        return {
            **os.environ,
            **db,
            "DAGSTER_HOME": str(dagster_home),
            "CCAT_OPS_DB_URL": ops_db_url,
            "CCAT_CELERY_BROKER_URL": self.broker.url,
            "CCAT_CELERY_BACKEND_URL": (
                f"db+postgresql+psycopg2://{db['DAGSTER_PG_USER']}@{db['DAGSTER_PG_HOST']}:"
                f"{db['DAGSTER_PG_PORT']}/{db['DAGSTER_PG_DB']}"
            ),
        }

    def site_env(self, central: dict[str, str]) -> dict[str, str]:
        """The same deployment as seen from the site: central services at the uplink's
        address, and the SSH key and known hosts that reach the site's hosts."""
        far = {
            name: central[name].replace("127.0.0.1", self.network.central)
            for name in (
                "DAGSTER_PG_HOST",
                "CCAT_OPS_DB_URL",
                "CCAT_CELERY_BROKER_URL",
                "CCAT_CELERY_BACKEND_URL",
            )
        }
        return {
            **central,
            **far,
            "CCAT_SSH_KEY_FILE": str(self.client_key),
            "CCAT_SSH_KNOWN_HOSTS": str(self.known_hosts),
            # As in production: every host confined to its disks (allowed_roots).
            "CCAT_ALLOWED_ROOTS": f"*={self.directory / 'disks'}",
            "CCAT_WORKER_QUEUES": f"ccat_{SITE}",
            "CCAT_WORKER_NAME": f"{SITE}@buffer",
            "CCAT_WORKER_CONCURRENCY": "2",
        }

    def start_worker(self, env: dict[str, str], log: Path, host: str = "buffer") -> Worker:
        log.parent.mkdir(parents=True, exist_ok=True)
        offset = log.stat().st_size if log.exists() else 0
        script = str(REPO / "scripts" / "run-dagster.sh")
        process = start_in_own_session(self.network.hosts[host].command(script, "worker"), env, log)
        worker = Worker(process, log, offset)
        try:
            worker.wait_ready()
        except BaseException:
            worker.kill()
            raise
        return worker


@contextlib.contextmanager
def observatory(directory: Path, prefix: str, net: int) -> Iterator[Observatory]:
    """Everything of the topology but the Dagster processes, torn down on the way out."""
    directory.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        network = stack.enter_context(network_up(prefix, net))
        broker = Broker(directory / "broker", free_port())
        stack.callback(broker.stop)
        broker.start()
        stack.enter_context(relays(network, {5432: 5432, broker.port: broker.port}))
        client_key = directory / "client_ed25519"
        public = keygen(client_key)
        servers = {
            host.name: stack.enter_context(
                running_sshd(
                    host.address,
                    directory / "sshd" / host.name,
                    [public],
                    port=22,
                    namespace=host.namespace,
                )
            )
            for host in network.hosts.values()
        }
        known_hosts = directory / "known_hosts"
        known_hosts.write_text("".join(f"{s.known_hosts_line}\n" for s in servers.values()))
        yield Observatory(directory, network, broker, servers, client_key, known_hosts)
