"""Assemblies that stop moving: they fail as retryable, name host and file, free their pool slot,
stop their heartbeat, and clean up once whatever hung answers again.

Every stall here is real. SIGSTOP stops a remote agent, as a hung disk or mount on its host
would leave it; or it stops the SSH server behind an sshfs mount: a network mount that stops
answering under a command that keeps running, here in this process or in a remote agent
(device-mapper, whose ``dmsetup suspend`` would hang a block device, is not available in this
kernel). SIGCONT lets it go on, and what was stopped must then clean up by itself.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import dagster as dg
import pytest
from sqlalchemy import update

from ccat_packaging import names
from ccat_packaging.assembly import archive
from ccat_packaging.claiming import PackageLimits, claim_packages
from ccat_packaging.discovery import GroupKey
from ccat_packaging.errors import StalledError
from ccat_packaging.models import LocationType, RawDataPackage, Status
from ccat_packaging.plans import Endpoint, PackagePlan
from ccat_packaging.registration import heartbeat
from ccat_packaging.resources import AssemblyHosts
from ccat_packaging_tests.dagster_helpers import run_partition
from ccat_packaging_tests.package_checks import (
    LONG_AGO,
    leftovers,
    packages_of,
    single_site,
    step_retries,
)
from ccat_packaging_tests.sshd import MakeHosts, SshLab, SshServer, running_sshd
from ccat_packaging_tests.test_ssh_assembly import (
    eventually,
    local,
    plan_for,
    sparse_tree,
    tmpfs,
)

pytest_plugins = ["ccat_packaging_tests.ssh_fixtures"]

STALL_SECONDS = 3
GIB = 1 << 30
CHANNEL_CLOSED = "the channel was closed, which stops the agent"


def agent_pids(servers: list[SshServer], command: str | None = None) -> list[int]:
    """The uploaded agents (``python3 -I -S -c BOOTSTRAP SHA256 AGENT COMMAND - ...``) that
    the sshd of one of ``servers`` started, running ``command`` or any: other tests on this
    machine may run agents of their own at the same time."""
    roots = {server.process.pid for server in servers}
    found = []
    for entry in os.listdir("/proc"):
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            if len(argv) < 8 or b"tar_agent-" not in argv[6]:
                continue
            running = command is None or argv[7] == command.encode()
            if running and roots & _ancestors(int(entry)):
                found.append(int(entry))
        except OSError:
            continue  # it ended meanwhile
    return found


def _ancestors(pid: int) -> set[int]:
    found: set[int] = set()
    while pid > 1 and len(found) < 16:
        stat = Path(f"/proc/{pid}/stat").read_text()
        pid = int(stat.rsplit(")", 1)[1].split()[1])
        found.add(pid)
    return found


def archive_started(buffer: Path) -> bool:
    return any(p.stat().st_size > 0 for p in buffer.rglob(".*.partial.*"))


def agent_threads() -> list[str]:
    """Local commands still running on their threads (``hosts._LocalProcess``)."""
    return [t.name for t in threading.enumerate() if t.name.startswith("agent-")]


@dataclass
class Outcome:
    """What an assembly on a thread came to, and when."""

    error: BaseException | None = None
    at: float = 0.0


def assemble_on_a_thread(
    hosts: AssemblyHosts, plan: PackagePlan, dest: Endpoint
) -> tuple[threading.Thread, Outcome]:
    outcome = Outcome()

    def assemble() -> None:
        try:
            archive.assemble(hosts, plan, dest)
        except BaseException as exc:
            outcome.error = exc
        outcome.at = time.monotonic()

    worker = threading.Thread(target=assemble, daemon=True)
    worker.start()
    return worker, outcome


def stalled_error(worker: threading.Thread, outcome: Outcome, since: float) -> StalledError:
    """The assembly's StalledError, which must come within a bounded time of ``since``."""
    worker.join(STALL_SECONDS + 20)
    assert not worker.is_alive(), "the stall was not noticed"
    assert isinstance(outcome.error, StalledError), outcome.error
    assert outcome.error.retryable
    detected = outcome.at - since
    print(f"stall noticed {detected:.2f} s after it began")
    assert STALL_SECONDS - 1 < detected < STALL_SECONDS + 5
    return outcome.error


def expected_message(location: str, host: str, command: str, stopped: str) -> str:
    """The stall's message as a pattern; ``host`` is one too."""
    return (
        rf"location '{location}' on {host}: {command} moved no bytes for "
        rf"{STALL_SECONDS} s after [1-9]\d* bytes \(in 'frame_\d\.dat' at its byte \d+ of "
        rf"{GIB}\); {re.escape(stopped)}"
    )


# --- a remote agent that stops -----------------------------------------------------------------

# Which agent stops: (source host, buffer host, command of the agent stopped).
STOPPED_AGENTS = {
    "the builder, building in place": ("a", "a", "build"),
    "the sender, streaming to another host": ("a", "b", "send"),
    "the receiver, streaming from another host": ("a", "b", "receive"),
}


@pytest.mark.parametrize("stopped", STOPPED_AGENTS)
def test_a_stopped_agent_fails_as_stalled_and_cleans_up_once_it_runs_again(
    make_hosts: MakeHosts,
    ssh_lab: SshLab,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    stopped: str,
) -> None:
    source_at, buffer_at, command = STOPPED_AGENTS[stopped]
    monkeypatch.setenv("CCAT_STALL_SECONDS", str(STALL_SECONDS))
    servers = {"a": ssh_lab.a, "b": ssh_lab.b}
    members = sparse_tree(tmp_path / "src", files=4, size=GIB)
    with tmpfs(tmp_path / "buffer", "5g") as buffer:
        plan, dest = plan_for(
            servers[source_at].endpoint(tmp_path / "src", "src"),
            servers[buffer_at].endpoint(buffer, "buf"),
            members,
        )
        worker, outcome = assemble_on_a_thread(make_hosts(), plan, dest)
        assert eventually(lambda: archive_started(buffer), 30), "the archive was never started"
        time.sleep(STALL_SECONDS / 4 + 0.25)  # the agent has reported progress by now
        lab = [ssh_lab.a, ssh_lab.b]
        [pid] = agent_pids(lab, command)
        os.kill(pid, signal.SIGSTOP)
        try:
            error = stalled_error(worker, outcome, time.monotonic())
            server = servers["b" if command == "receive" else source_at]
            host = re.escape(server.address)
            location = "buf" if command == "receive" else "src"
            pattern = expected_message(location, host, command, CHANNEL_CLOSED)
            assert re.search(pattern, str(error)), error
            assert agent_pids(lab, command) == [pid]  # stopped, so still there
        finally:
            os.kill(pid, signal.SIGCONT)
        assert eventually(lambda: agent_pids(lab) == [], 30), agent_pids(lab)
        assert eventually(lambda: leftovers(buffer) == []), leftovers(buffer)


# --- a mount that stops answering under this process ---------------------------------------------


@dataclass
class Mount:
    """``path`` is ``exported`` on ``server``, mounted here with sshfs."""

    path: Path
    exported: Path
    server: SshServer

    def signal(self, number: signal.Signals) -> None:
        for pid in self.server.sshd_pids():
            with suppress(ProcessLookupError):
                os.kill(pid, number)


@pytest.fixture
def mount(ssh_lab: SshLab, tmp_path: Path) -> Iterator[Mount]:
    """A network mount of our own: an sshd on 127.0.0.7 and sshfs in the foreground."""
    if shutil.which("sshfs") is None:
        pytest.fail("sshfs is missing: run scripts/test-setup.sh (installs it)")
    public = ssh_lab.client_key.with_suffix(".pub").read_text()
    with running_sshd("127.0.0.7", tmp_path / "mount_host", [public]) as server:
        known_hosts = tmp_path / "mount_known_hosts"
        known_hosts.write_text(server.known_hosts_line + "\n")
        exported, path = tmp_path / "exported", tmp_path / "mount"
        exported.mkdir()
        path.mkdir()
        options = (
            f"IdentityFile={ssh_lab.client_key},UserKnownHostsFile={known_hosts},"
            "StrictHostKeyChecking=yes,BatchMode=yes"
        )
        command = ["sshfs", "-f", "-p", str(server.port), "-o", options]
        with open(tmp_path / "sshfs.log", "wb") as log:
            sshfs = subprocess.Popen(
                [*command, f"root@{server.address}:{exported}", str(path)], stderr=log
            )
        mounted = Mount(path, exported, server)
        try:
            assert eventually(lambda: os.path.ismount(path), 10), (
                tmp_path / "sshfs.log"
            ).read_text()
            yield mounted
        finally:
            mounted.signal(signal.SIGCONT)
            subprocess.run(["fusermount3", "-u", "-z", str(path)], check=False, timeout=30)
            try:
                sshfs.wait(10)
            except subprocess.TimeoutExpired:
                sshfs.kill()
                sshfs.wait(10)


HOSTNAME = "localhost"  # how the local endpoints (and so the messages) name this machine
LOCAL_STOP = "it was told to stop and removes its temporary file once its blocked system call"


def test_a_build_reading_from_a_mount_that_stops_answering_fails_as_stalled(
    mount: Mount, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The build runs on a thread of this process and sits in a read nothing can interrupt;
    the op's thread gives up on it, and it removes its temporary file once the read returns."""
    monkeypatch.setenv("CCAT_STALL_SECONDS", str(STALL_SECONDS))
    members = sparse_tree(mount.exported / "src", files=2, size=GIB)
    with tmpfs(tmp_path / "buffer", "3g") as buffer:
        plan, dest = plan_for(local(mount.path / "src", "src"), local(buffer, "buf"), members)
        hosts = AssemblyHosts()
        worker, outcome = assemble_on_a_thread(hosts, plan, dest)
        assert eventually(lambda: archive_started(buffer), 30), "the archive was never started"
        mount.signal(signal.SIGSTOP)
        try:
            error = stalled_error(worker, outcome, time.monotonic())
            pattern = expected_message("src", HOSTNAME, "build", LOCAL_STOP)
            assert re.search(pattern, str(error)), error
            assert agent_threads() == ["agent-build"]  # still in its read
            assert [p.name for p in buffer.rglob(".*.partial.*")] != []
        finally:
            mount.signal(signal.SIGCONT)
        assert eventually(lambda: agent_threads() == [], 30), agent_threads()
        assert eventually(lambda: leftovers(buffer) == []), leftovers(buffer)


def test_a_remote_agent_alive_but_stuck_on_a_mount_fails_as_stalled(
    mount: Mount, ssh_lab: SshLab, make_hosts: MakeHosts, tmp_path: Path, monkeypatch
) -> None:
    """The agent on the SSH host still runs (unlike a stopped one) but its read does not
    return: only its progress, not its being alive, tells the worker that it is stuck."""
    monkeypatch.setenv("CCAT_STALL_SECONDS", str(STALL_SECONDS))
    members = sparse_tree(mount.exported / "src", files=2, size=GIB)
    with tmpfs(tmp_path / "buffer", "3g") as buffer:
        plan, dest = plan_for(
            ssh_lab.a.endpoint(mount.path / "src", "src"),
            ssh_lab.a.endpoint(buffer, "buf"),
            members,
        )
        worker, outcome = assemble_on_a_thread(make_hosts(), plan, dest)
        assert eventually(lambda: archive_started(buffer), 30), "the archive was never started"
        time.sleep(STALL_SECONDS / 4 + 0.25)  # the agent has reported progress by now
        [pid] = agent_pids([ssh_lab.a], "build")
        mount.signal(signal.SIGSTOP)
        try:
            error = stalled_error(worker, outcome, time.monotonic())
            host = re.escape(ssh_lab.a.address)
            pattern = expected_message("src", host, "build", CHANNEL_CLOSED)
            assert re.search(pattern, str(error)), error
            assert agent_pids([ssh_lab.a], "build") == [pid]  # stuck in its read
        finally:
            mount.signal(signal.SIGCONT)
        assert eventually(lambda: agent_pids([ssh_lab.a]) == [], 30), agent_pids([ssh_lab.a])
        assert eventually(lambda: leftovers(buffer) == []), leftovers(buffer)


def test_a_receive_writing_to_a_mount_that_stops_answering_fails_as_stalled(
    mount: Mount, ssh_lab: SshLab, make_hosts: MakeHosts, tmp_path: Path, monkeypatch
) -> None:
    """The buffer is this machine, on a mount that stops taking writes: the receiver's buffers
    fill, the archive stops flowing into its pipe, and the op's thread gives up on it."""
    monkeypatch.setenv("CCAT_STALL_SECONDS", str(STALL_SECONDS))
    members = sparse_tree(tmp_path / "src", files=2, size=GIB)
    plan, dest = plan_for(
        ssh_lab.a.endpoint(tmp_path / "src", "src"), local(mount.path, "buf"), members
    )
    worker, outcome = assemble_on_a_thread(make_hosts(), plan, dest)
    assert eventually(lambda: archive_started(mount.path), 30), "the archive was never started"
    mount.signal(signal.SIGSTOP)
    try:
        error = stalled_error(worker, outcome, time.monotonic())
        pattern = expected_message("buf", HOSTNAME, "receive", LOCAL_STOP)
        assert re.search(pattern, str(error)), error
        assert agent_threads() == ["agent-receive"]  # still in its write
    finally:
        mount.signal(signal.SIGCONT)
    assert eventually(lambda: agent_threads() == [], 30), agent_threads()
    assert eventually(lambda: leftovers(mount.path) == []), leftovers(mount.path)
    assert eventually(lambda: agent_pids([ssh_lab.a]) == [], 30), agent_pids([ssh_lab.a])


# --- the heartbeat follows progress ------------------------------------------------------------


def test_the_heartbeat_beats_while_bytes_move_and_stops_when_they_stop(
    world, make_hosts: MakeHosts, ssh_lab: SshLab, tmp_path: Path, monkeypatch
) -> None:
    """The lease of a live but stalled assembly must go stale: its heartbeat beats on the bytes
    this run's commands move (``AssemblyHosts.moved``), not on the process being alive."""
    stall = 6  # progress lines every 1.5 s; the stall is noticed 4.5 to 6 s after SIGSTOP
    monkeypatch.setenv("CCAT_STALL_SECONDS", str(stall))
    _, _, _, group, key = single_site(world)
    world.file(group, "a.dat")
    with world.session() as s:
        [package] = claim_packages(s, GroupKey.parse(key), PackageLimits(10**9, 100), "run")
        s.execute(update(RawDataPackage).values(updated_at=LONG_AGO))

    def updated_at() -> datetime:
        with world.session() as s:
            return s.get_one(RawDataPackage, package.package_id).updated_at

    members = sparse_tree(tmp_path / "src", files=4, size=GIB)
    hosts = make_hosts()
    with tmpfs(tmp_path / "buffer", "5g") as buffer:
        plan, dest = plan_for(
            ssh_lab.a.endpoint(tmp_path / "src", "src"), ssh_lab.a.endpoint(buffer, "buf"), members
        )
        with heartbeat(world.engine, package.package_id, 0.25, lambda: hosts.moved):
            worker, outcome = assemble_on_a_thread(hosts, plan, dest)
            assert eventually(lambda: updated_at() != LONG_AGO, 30), "no beat while building"
            first_beat = updated_at()
            assert eventually(lambda: updated_at() != first_beat, 10), "it beat only once"
            [pid] = agent_pids([ssh_lab.a], "build")
            os.kill(pid, signal.SIGSTOP)
            try:
                time.sleep(1.5)  # progress reported before the stop has arrived by now
                last_beat = updated_at()
                time.sleep(2.5)  # still before the stall is noticed
                assert updated_at() == last_beat, "the heartbeat went on without progress"
                worker.join(stall + 20)
                assert isinstance(outcome.error, StalledError), outcome.error
            finally:
                os.kill(pid, signal.SIGCONT)
        assert updated_at() == last_beat
        assert eventually(lambda: leftovers(buffer) == []), leftovers(buffer)


# --- the job: a stalled step is retried, its pool slot freed -------------------------------------


def test_a_stalled_assembly_fails_its_step_as_retryable_frees_its_slot_and_is_retried(
    world, ssh_lab: SshLab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CCAT_SSH_KEY_FILE", str(ssh_lab.client_key))
    monkeypatch.setenv("CCAT_SSH_KNOWN_HOSTS", str(ssh_lab.known_hosts))
    monkeypatch.setenv("CCAT_STALL_SECONDS", str(STALL_SECONDS))
    monkeypatch.setenv("CCAT_RETRY_BASE_SECONDS", "8")  # 4 to 12 s: time to look at the pool
    a = ssh_lab.a
    site = world.site()
    source = world.location(
        site, "remote_src", LocationType.SOURCE, host=a.address, port=a.port, user="root"
    )
    group = world.group(source)
    for name, size in sparse_tree(world.root(source) / "obs", files=3, size=GIB):
        world.file(group, f"obs/{name}", write=False, size=size)
    key = f"remote_src__eou{group.eou_id}__mod{group.module_id}"
    pool = names.host_pool(a.address)

    def package() -> RawDataPackage:
        [only] = packages_of(world)
        return only

    with tmpfs(tmp_path / "buffer", "4g") as buffer_root:
        world.location(
            site,
            "buf",
            LocationType.BUFFER,
            host=a.address,
            port=a.port,
            user="root",
            root=buffer_root,
        )
        seen: dict[str, object] = {}

        def claimed(instance: dg.DagsterInstance) -> int:
            return len(instance.event_log_storage.get_concurrency_info(pool).claimed_slots)

        def stall_the_first_build(instance: dg.DagsterInstance) -> None:
            """Bounded throughout: whatever happens, the agent runs again within 60 s."""
            if not eventually(lambda: archive_started(buffer_root), 60):
                return
            seen["slots while building"] = claimed(instance)
            time.sleep(STALL_SECONDS / 4 + 0.25)
            [pid] = agent_pids([a], "build")
            os.kill(pid, signal.SIGSTOP)
            stopped_at = time.monotonic()
            try:
                if eventually(lambda: package().retry_count == 1, STALL_SECONDS + 20):
                    seen["recorded after"] = time.monotonic() - stopped_at
                    seen["reason"] = package().failure_reason
                    seen["slot freed"] = eventually(lambda: claimed(instance) == 0, 2)
            finally:
                os.kill(pid, signal.SIGCONT)
            seen["agent gone"] = eventually(lambda: pid not in agent_pids([a]), 30)

        overrides = {"concurrency": {"pools": {"default_limit": 1}}}
        with dg.instance_for_test(overrides=overrides) as instance:
            watcher = threading.Thread(target=stall_the_first_build, args=(instance,))
            watcher.start()
            result = run_partition(instance, key)
            watcher.join(120)
            slots_after_the_run = claimed(instance)

        print(f"the stall was recorded {seen.get('recorded after')} s after SIGSTOP")
        assert seen["slots while building"] == 1  # the assembly holds the host's slot
        assert seen["slot freed"]  # given up with the step, before its retry (4 to 12 s)
        assert isinstance(seen["recorded after"], float)
        assert seen["recorded after"] < STALL_SECONDS + 5
        reason = str(seen["reason"])
        assert reason.startswith("retrying after: StalledError: location 'remote_src' on 127.0.0.")
        assert re.search(r"build moved no bytes .* \(in 'obs/frame_\d\.dat' at its byte", reason)
        assert seen["agent gone"]
        assert result.success
        assert step_retries(result) == 1
        done = package()
        assert done.status == Status.COMPLETED and done.retry_count == 1
        assert leftovers(buffer_root) == []
        assert slots_after_the_run == 0
