"""Assembly over real SSH: the same bytes as locally, hostile names, refusals, failures.

The runners get the package's members directly here. That is the only way to test names that
are not UTF-8: the operations database stores ``relative_path`` as text, so such files cannot
be filed through it. Every other name of the corpus also goes through the Dagster job end to
end in ``test_ssh_job.py``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import subprocess
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import paramiko
import pytest

from ccat_packaging.assembly import archive, tar_agent
from ccat_packaging.assembly.archive import AssembledArchive
from ccat_packaging.assembly.hosts import AgentProcess, is_same_host
from ccat_packaging.errors import (
    ArchiveVerificationError,
    AuthenticationFailedError,
    ConfigurationError,
    HostKeyError,
    HostUnreachableError,
    InsufficientSpaceError,
    PackagingError,
    RetryableError,
    SourceFileError,
    SpaceReservedError,
    UnsafePathError,
)
from ccat_packaging.plans import Endpoint, PackagePlan
from ccat_packaging.resources import AssemblyHosts
from ccat_packaging_tests.special_files import SPECIAL
from ccat_packaging_tests.sshd import (
    MakeHosts,
    SshLab,
    SshServer,
    free_port,
    keygen,
    running_sshd,
)

pytest_plugins = ["ccat_packaging_tests.ssh_fixtures"]

# Names a shell, tar's option parser or a newline-separated list would get wrong. Each one that
# could run something would create a PWNED* file.
HOSTILE_NAMES = [
    "with space.dat",
    "  lead and trail  ",
    "tab\there.dat",
    "new\nline.dat",
    "carriage\rreturn.dat",
    "quote'single.dat",
    'quote"double.dat',
    "back\\slash\\n.dat",
    "$(touch PWNED_subst).dat",
    "`touch PWNED_tick`.dat",
    "semi;touch PWNED_semi;.dat",
    "pipe|touch PWNED_pipe.dat",
    "amp&&touch PWNED_amp.dat",
    "redirect>PWNED_redirect.dat",
    "star*?[x].dat",
    "-C",
    "-rf",
    "--remove-files",
    "--to-command=touch PWNED_option",
    "-dir/--checkpoint-action=exec=touch PWNED_cp/-x.dat",
    "ünïcödé/café ☕.dat",
    "n" * 99 + ".x",  # 101 bytes: just past the 100-byte tar name field
    "long/" + "m" * 200 + "/" + "k" * 250 + ".dat",
    "/".join(f"level{i:02d}" for i in range(40)) + "/deep.dat",
]
# Stored with surrogateescape, as os.fsdecode gives them; on disk these are the raw bytes.
NON_UTF8_NAMES = ["latin1-\udce9t\udce9.dat", "raw bytes/\udcff\udcfe\udc80.bin"]


def _byte_order(members: list[tuple[str, int]]) -> tuple[tuple[str, int], ...]:
    return tuple(sorted(members, key=lambda m: os.fsencode(m[0])))


@dataclass(frozen=True)
class Corpus:
    root: Path
    contents: dict[str, bytes]

    @property
    def members(self) -> tuple[tuple[str, int], ...]:
        return _byte_order([(name, len(data)) for name, data in self.contents.items()])


def write_tree(root: Path, contents: dict[str, bytes]) -> None:
    for name, data in contents.items():
        path = os.path.join(os.fsencode(root), os.fsencode(name))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as handle:
            handle.write(data)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    root = tmp_path_factory.mktemp("hostile_source")
    names = HOSTILE_NAMES + NON_UTF8_NAMES
    contents = {name: os.urandom(100 + 997 * i) for i, name in enumerate(names)}
    contents["empty.dat"] = b""
    write_tree(root, contents)
    return Corpus(root, contents)


def local(root: Path, name: str = "local", location_id: int = 10) -> Endpoint:
    return Endpoint(location_id, name, "localhost", None, 22, str(root))


def plan_for(
    source: Endpoint, buffer: Endpoint, members: tuple[tuple[str, int], ...]
) -> tuple[PackagePlan, Endpoint]:
    """A plan and the buffer to assemble it into."""
    return PackagePlan(1, "pkg", "grp", 1, "site/eou1/pkg.tar", source, 1, members), buffer


def package(
    hosts: AssemblyHosts, plan: PackagePlan, dest: Endpoint
) -> tuple[AssembledArchive, Path]:
    built = archive.assemble(hosts, plan, dest)
    archive.verify(hosts, plan, built)
    return built, Path(archive.publish(hosts, plan, built)["path"])


def leftovers(directory: Path) -> list[str]:
    """Files other than lock files: partial archives, stray outputs."""
    return sorted(p.name for p in directory.rglob("*") if p.is_file() and ".lock" not in p.name)


def remote_agents(*servers: SshServer) -> list[str]:
    """Command lines of running agents that were uploaded to one of ``servers`` (local runs
    never are). An agent is known by its session's ``SSH_CONNECTION`` (it names the server's
    address and port), which outlives a crashed sshd; agents of other tests that run at the
    same time, on other servers, are not counted."""
    ours = {f" {server.address} {server.port}".encode() for server in servers}
    found = []
    for entry in os.listdir("/proc"):
        try:
            command = Path(f"/proc/{entry}/cmdline").read_bytes()
            if b"tar_agent-" not in command:
                continue
            environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        connection = next((v for v in environ if v.startswith(b"SSH_CONNECTION=")), b"")
        if any(connection.endswith(server) for server in ours):
            found.append(command.replace(b"\0", b" ").decode(errors="replace"))
    return found


def eventually(check: Callable[[], bool], seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def assert_built_over_ssh(
    built: AssembledArchive, server: SshServer, contents: dict[str, bytes]
) -> None:
    """The agent ran on ``server`` and left there an archive of exactly ``contents`` whose
    sha256 is the one it reported: the command did its work, not merely returned."""
    assert built.via_ssh and built.buffer.host == server.address
    data = Path(built.temp_path).read_bytes()  # the lab's hosts share this file system
    assert len(data) == built.size and hashlib.sha256(data).hexdigest() == built.checksum
    with tarfile.open(built.temp_path) as tar:
        found = {m.name: tar.extractfile(m).read() for m in tar}  # type: ignore[union-attr]
    assert found == contents


@pytest.fixture
def hosts(make_hosts: MakeHosts) -> AssemblyHosts:
    return make_hosts()


@pytest.fixture(scope="module")
def reference(corpus: Corpus, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The corpus packaged locally, without SSH: what every other way must reproduce."""
    buffer = tmp_path_factory.mktemp("reference_buffer")
    plan, dest = plan_for(local(corpus.root, "src"), local(buffer, "buf"), corpus.members)
    _, path = package(AssemblyHosts(), plan, dest)
    return path.read_bytes()


def test_loopback_addresses_of_the_test_hosts_are_not_this_machine() -> None:
    assert not is_same_host("127.0.0.2")
    assert not is_same_host("127.0.0.3")
    assert is_same_host("localhost")
    assert is_same_host("127.0.0.1")
    assert is_same_host(os.uname().nodename)


TOPOLOGIES = {
    "ssh source, buffer on the same host": ("a", "a"),
    "ssh source, buffer on another ssh host": ("a", "b"),
    "ssh source, buffer on this machine": ("a", "local"),
    "local source, buffer on an ssh host": ("local", "b"),
}


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_archive_is_byte_identical_to_the_local_one_and_nothing_is_executed(
    topology: str,
    ssh_lab: SshLab,
    hosts: AssemblyHosts,
    corpus: Corpus,
    reference: bytes,
    tmp_path: Path,
) -> None:
    source_at, buffer_at = TOPOLOGIES[topology]
    servers = {"a": ssh_lab.a, "b": ssh_lab.b}

    def endpoint(at: str, root: Path, name: str) -> Endpoint:
        return local(root, name) if at == "local" else servers[at].endpoint(root, name)

    (tmp_path / "buffer").mkdir()
    source = endpoint(source_at, corpus.root, "src")
    plan, dest = plan_for(source, endpoint(buffer_at, tmp_path / "buffer", "buf"), corpus.members)

    built, path = package(hosts, plan, dest)

    assert path.read_bytes() == reference
    assert built.checksum == hashlib.sha256(reference).hexdigest()
    assert built.via_ssh == (source_at != "local")
    with tarfile.open(path, encoding="utf-8", errors="surrogateescape") as tar:
        listed = [(m.name, m.size) for m in tar]
        assert listed == list(corpus.members)
        for name, data in corpus.contents.items():
            member = tar.extractfile(name)
            assert member is not None and member.read() == data, name
    assert leftovers(tmp_path / "buffer") == ["pkg.tar"]
    for place in (corpus.root, tmp_path, Path.home(), Path.cwd(), Path("/tmp")):
        assert list(place.glob("PWNED*")) == [], place

    again = archive.assemble(hosts, plan, dest)  # re-running gives the same bytes
    assert again.checksum == built.checksum
    archive.discard(hosts, again)


@pytest.mark.parametrize("bad", ["../outside.dat", "/etc/passwd", "a/../../x.dat", "nul\0.dat"])
def test_paths_escaping_their_root_are_refused_before_any_host_is_contacted(
    make_hosts: MakeHosts, ssh_lab: SshLab, tmp_path: Path, bad: str
) -> None:
    # A key file that does not exist: contacting the host would fail with another error.
    hosts = make_hosts(key_filename=str(tmp_path / "no-such-key"))
    plan, dest = plan_for(
        ssh_lab.a.endpoint(tmp_path, "src"), ssh_lab.b.endpoint(tmp_path, "buf"), ((bad, 1),)
    )
    with pytest.raises(UnsafePathError, match=r"location 'src' on 127\.0\.0\.2") as info:
        archive.assemble(hosts, plan, dest)
    assert not info.value.retryable
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("name", ["dirlink/secret.key", "filelink.dat"])
def test_symlinks_leading_out_of_the_root_are_refused_on_the_remote_host(
    ssh_lab: SshLab, hosts: AssemblyHosts, tmp_path: Path, name: str
) -> None:
    source, outside, buffer = tmp_path / "src", tmp_path / "outside", tmp_path / "buf"
    for directory in (source, outside, buffer):
        directory.mkdir()
    (outside / "secret.key").write_bytes(b"secret")
    (source / "dirlink").symlink_to(outside)
    (source / "filelink.dat").symlink_to(outside / "secret.key")
    plan, dest = plan_for(
        ssh_lab.a.endpoint(source, "src"), ssh_lab.a.endpoint(buffer, "buf"), ((name, 6),)
    )
    with pytest.raises(UnsafePathError, match=rf"location 'src' on 127\.0\.0\.2: .*{name}"):
        archive.assemble(hosts, plan, dest)
    assert leftovers(buffer) == []


@pytest.mark.parametrize("case", ["missing", "changed size"])
@pytest.mark.parametrize("buffer_at", ["a", "b"])
def test_missing_or_changed_source_file_is_a_clear_permanent_error(
    ssh_lab: SshLab, hosts: AssemblyHosts, tmp_path: Path, case: str, buffer_at: str
) -> None:
    source, buffer = tmp_path / "src", tmp_path / "buf"
    buffer.mkdir()
    write_tree(source, {"ok.dat": b"fine", "obs/bad file.dat": b"12345"})
    if case == "missing":
        (source / "obs" / "bad file.dat").unlink()
    else:
        (source / "obs" / "bad file.dat").write_bytes(b"123456")
    members = (("obs/bad file.dat", 5), ("ok.dat", 4))
    server = ssh_lab.a if buffer_at == "a" else ssh_lab.b
    plan, dest = plan_for(
        ssh_lab.a.endpoint(source, "src"), server.endpoint(buffer, "buf"), members
    )
    with pytest.raises(
        SourceFileError, match=r"location 'src' on .*127\.0\.0\.2.*'obs/bad file\.dat'"
    ):
        archive.assemble(hosts, plan, dest)
    assert eventually(lambda: leftovers(buffer) == [])


@pytest.mark.parametrize("kind", ["named pipe", "socket", "character device"])
@pytest.mark.parametrize("buffer_at", ["a", "b"])
def test_a_special_file_fails_at_once_on_the_remote_host(
    ssh_lab: SshLab, hosts: AssemblyHosts, tmp_path: Path, kind: str, buffer_at: str
) -> None:
    source, buffer = tmp_path / "src", tmp_path / "buf"
    buffer.mkdir()
    write_tree(source, {"ok.dat": b"fine"})
    SPECIAL[kind](source / "odd.dat")
    server = ssh_lab.a if buffer_at == "a" else ssh_lab.b
    plan, dest = plan_for(
        ssh_lab.a.endpoint(source, "src"),
        server.endpoint(buffer, "buf"),
        (("odd.dat", 0), ("ok.dat", 4)),
    )
    failure: list[BaseException] = []

    def attempt() -> None:
        try:
            archive.assemble(hosts, plan, dest)
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive(), f"assembly blocked on the {kind}"
    [error] = failure
    assert isinstance(error, SourceFileError)
    assert f"'odd.dat' is not a regular file but a {kind}" in str(error)
    assert eventually(lambda: leftovers(buffer) == [])


def test_unknown_host_key_is_refused(
    make_hosts: MakeHosts, ssh_lab: SshLab, tmp_path: Path
) -> None:
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(ssh_lab.b.known_hosts_line + "\n")  # a's key is not there
    hosts = make_hosts(known_hosts=str(known_hosts))
    plan, dest = plan_for(
        ssh_lab.a.endpoint(tmp_path, "src"), ssh_lab.a.endpoint(tmp_path, "buf"), ()
    )
    with pytest.raises(
        HostKeyError, match=r"127\.0\.0\.2\]:\d+ offered ssh-ed25519 SHA256:.* not in"
    ) as info:
        archive.assemble(hosts, plan, dest)
    assert not info.value.retryable


def test_changed_host_key_is_refused_even_when_trusting_new_hosts(
    make_hosts: MakeHosts, ssh_lab: SshLab, tmp_path: Path
) -> None:
    other_key = keygen(tmp_path / "impostor")
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[{ssh_lab.a.address}]:{ssh_lab.a.port} {other_key}\n")
    plan, dest = plan_for(
        ssh_lab.a.endpoint(tmp_path, "src"), ssh_lab.a.endpoint(tmp_path, "buf"), ()
    )
    for trust in (False, True):
        hosts = make_hosts(known_hosts=str(known_hosts), trust_unknown_hosts=trust)
        with pytest.raises(HostKeyError, match="but the known hosts file has") as info:
            archive.assemble(hosts, plan, dest)
        assert not info.value.retryable


def test_trusting_unknown_hosts_is_an_opt_in_that_records_the_key(
    make_hosts: MakeHosts, ssh_lab: SshLab, tmp_path: Path
) -> None:
    known_hosts = tmp_path / "known_hosts"
    (tmp_path / "buf").mkdir()
    write_tree(tmp_path / "src", {"a.dat": b"abc"})
    plan, dest = plan_for(
        ssh_lab.a.endpoint(tmp_path / "src", "src"),
        ssh_lab.a.endpoint(tmp_path / "buf", "buf"),
        (("a.dat", 3),),
    )
    with pytest.raises(ConfigurationError, match="does not exist"):
        archive.assemble(make_hosts(known_hosts=str(known_hosts)), plan, dest)
    assert not known_hosts.exists() and leftovers(tmp_path / "buf") == []
    hosts = make_hosts(known_hosts=str(known_hosts), trust_unknown_hosts=True)
    assert_built_over_ssh(archive.assemble(hosts, plan, dest), ssh_lab.a, {"a.dat": b"abc"})
    hosts.close()
    [line] = known_hosts.read_text().splitlines()
    assert line.split()[1:] == ssh_lab.a.host_public_key.split()[:2]
    assert line.split()[0] == f"[{ssh_lab.a.address}]:{ssh_lab.a.port}"
    assert stat.S_IMODE(known_hosts.stat().st_mode) == 0o600
    hosts = make_hosts(known_hosts=str(known_hosts))  # now a known host, trusted or not
    assert_built_over_ssh(archive.assemble(hosts, plan, dest), ssh_lab.a, {"a.dat": b"abc"})


def small_package(server: SshServer, root: Path) -> tuple[PackagePlan, Endpoint]:
    """A one-file package of ``root``/src built on ``server`` into ``root``/buf."""
    (root / "buf").mkdir(exist_ok=True)
    write_tree(root / "src", {"a.dat": b"abc"})
    return plan_for(
        server.endpoint(root / "src", "src"), server.endpoint(root / "buf", "buf"), (("a.dat", 3),)
    )


def test_a_recorded_host_key_is_used_by_later_runs_and_a_changed_one_refused(
    make_hosts: MakeHosts, ssh_lab: SshLab, tmp_path: Path
) -> None:
    public = ssh_lab.client_key.with_suffix(".pub").read_text()
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("# kept as it is\n" + ssh_lab.b.known_hosts_line)  # no newline

    def assemble(server: SshServer, trust: bool) -> AssembledArchive:
        hosts = make_hosts(known_hosts=str(known_hosts), trust_unknown_hosts=trust)
        try:
            return archive.assemble(hosts, *small_package(server, tmp_path / server.directory.name))
        finally:
            hosts.close()

    with running_sshd("127.0.0.6", tmp_path / "first", [public]) as first:
        assert_built_over_ssh(assemble(first, trust=True), first, {"a.dat": b"abc"})
        recorded = known_hosts.read_text()
        assert recorded.splitlines() == [
            "# kept as it is",
            ssh_lab.b.known_hosts_line,
            " ".join(first.known_hosts_line.split()[:3]),
        ]
        assert stat.S_IMODE(known_hosts.stat().st_mode) == 0o600
        assert_built_over_ssh(assemble(first, trust=False), first, {"a.dat": b"abc"})
    # The same address and port, another host key: what a machine in the middle would offer.
    with running_sshd("127.0.0.6", tmp_path / "second", [public], port=first.port) as second:
        for trust in (True, False):
            with pytest.raises(HostKeyError, match="but the known hosts file has"):
                assemble(second, trust)
    assert known_hosts.read_text() == recorded


def test_trusting_unknown_hosts_without_a_known_hosts_file_records_keys_in_the_default_one(
    make_hosts: MakeHosts, ssh_lab: SshLab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    plan, dest = small_package(ssh_lab.a, tmp_path)
    with pytest.raises(ConfigurationError, match="known_hosts does not exist"):
        archive.assemble(make_hosts(known_hosts=None), plan, dest)
    hosts = make_hosts(known_hosts=None, trust_unknown_hosts=True)
    assert_built_over_ssh(archive.assemble(hosts, plan, dest), ssh_lab.a, {"a.dat": b"abc"})
    known_hosts = tmp_path / "home/.ssh/known_hosts"
    assert known_hosts.read_text().split() == ssh_lab.a.known_hosts_line.split()[:3]
    assert stat.S_IMODE(known_hosts.stat().st_mode) == 0o600
    assert stat.S_IMODE(known_hosts.parent.stat().st_mode) == 0o700
    hosts = make_hosts(known_hosts=None)  # the next run, not trusting: the key is pinned
    assert_built_over_ssh(archive.assemble(hosts, plan, dest), ssh_lab.a, {"a.dat": b"abc"})


@pytest.mark.parametrize(
    "weakness", ["world-writable", "group-writable", "other owner", "shared directory"]
)
def test_a_known_hosts_file_others_can_change_is_refused(
    make_hosts: MakeHosts, ssh_lab: SshLab, tmp_path: Path, weakness: str
) -> None:
    """Whoever can write the file can add their own key for any host, and be trusted."""
    directory = tmp_path / "ssh"
    directory.mkdir(mode=0o700)
    known_hosts = directory / "known_hosts"
    known_hosts.write_text(f"{ssh_lab.a.known_hosts_line}\n")
    known_hosts.chmod(0o600)
    offender, problem = known_hosts, r"its group or others can write it \(mode 0666"
    if weakness == "world-writable":
        known_hosts.chmod(0o666)
    elif weakness == "group-writable":
        known_hosts.chmod(0o620)
        problem = r"its group or others can write it \(mode 0620"
    elif weakness == "other owner":
        os.chown(known_hosts, 12345, 12345)
        problem = r"it is owned by another user \(mode 0600, owner uid 12345\)"
    else:  # anyone can replace the file with one of theirs
        directory.chmod(0o777)
        offender, problem = directory, r"its group or others can write it \(mode 0777"
    plan, dest = small_package(ssh_lab.a, tmp_path)
    for trust in (False, True):
        hosts = make_hosts(known_hosts=str(known_hosts), trust_unknown_hosts=trust)
        with pytest.raises(
            ConfigurationError,
            match=rf"the known hosts file {known_hosts} could be changed by others "
            rf"\({offender}: {problem}",
        ) as info:
            archive.assemble(hosts, plan, dest)
        assert not info.value.retryable
    assert leftovers(tmp_path / "buf") == []


def planted_agent(directory: Path, marker: Path) -> Path:
    """A file under the name this version's agent has, which creates ``marker`` if it runs."""
    digest = hashlib.sha256(Path(tar_agent.__file__).read_bytes()).hexdigest()
    path = directory / f"tar_agent-{digest[:16]}.py"
    path.write_text(f"open({str(marker)!r}, 'w').close()\n")
    path.chmod(0o644)
    return path


def test_a_planted_agent_file_is_replaced_not_run(
    make_hosts: MakeHosts,
    ssh_lab: SshLab,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    agents, marker = tmp_path / "agents", tmp_path / "PLANTED_RAN"
    agents.mkdir(mode=0o700)
    planted = planted_agent(agents, marker)
    hosts = make_hosts(remote_dir=str(agents))
    with caplog.at_level(logging.WARNING, logger="ccat_packaging.assembly.ssh"):
        built = archive.assemble(hosts, *small_package(ssh_lab.a, tmp_path))
    assert_built_over_ssh(built, ssh_lab.a, {"a.dat": b"abc"})
    assert not marker.exists()
    assert planted.read_bytes() == Path(tar_agent.__file__).read_bytes()
    assert [p.name for p in agents.iterdir()] == [planted.name]  # no partial upload left
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"location 'src' on 127.0.0.2: {planted} was not the tar agent (sha256 " in warning
    assert warning.endswith("; replaced it")


def test_an_agent_file_changed_after_its_upload_is_not_run(
    make_hosts: MakeHosts, ssh_lab: SshLab, tmp_path: Path
) -> None:
    """The content is checked on the host by what runs it, at every command, not once."""
    agents, marker = tmp_path / "agents", tmp_path / "PLANTED_RAN"
    agents.mkdir(mode=0o700)
    hosts = make_hosts(remote_dir=str(agents))
    plan, dest = small_package(ssh_lab.a, tmp_path)
    archive.discard(hosts, archive.assemble(hosts, plan, dest))  # uploads the agent
    planted = planted_agent(agents, marker)  # while the connection still knows it as ours
    with pytest.raises(
        PackagingError, match=r"is not the tar agent of sha256 [0-9a-f]{64}"
    ) as info:
        archive.assemble(hosts, plan, dest)
    assert f"{planted} is not the tar agent" in str(info.value)
    assert "(changed since its upload); not run" in str(info.value)
    assert not marker.exists() and leftovers(tmp_path / "buf") == []


@pytest.mark.parametrize("weakness", ["world-writable", "group-writable parent", "other owner"])
def test_an_agent_directory_others_can_change_is_refused(
    make_hosts: MakeHosts, ssh_lab: SshLab, tmp_path: Path, weakness: str
) -> None:
    """Whoever can write there can put their code under the agent's name, to run as us."""
    agents, marker = tmp_path / "shared/agents", tmp_path / "PLANTED_RAN"
    agents.mkdir(parents=True, mode=0o700)
    planted = planted_agent(agents, marker)
    offender, problem = agents, r"its group or others can write it \(mode 0777, owner uid 0\)"
    if weakness == "world-writable":
        agents.chmod(0o777)
    elif weakness == "group-writable parent":
        agents.parent.chmod(0o775)
        offender, problem = agents.parent, r"its group or others can write it \(mode 0775"
    else:
        os.chown(agents, 12345, 12345)
        problem = r"it is owned by another user \(mode 0700, owner uid 12345\)"
    hosts = make_hosts(remote_dir=str(agents))
    with pytest.raises(
        ConfigurationError,
        match=rf"the agent directory {agents} could be changed by others than root "
        rf"\({offender}: {problem}.*refusing to run the agent from there",
    ) as info:
        archive.assemble(hosts, *small_package(ssh_lab.a, tmp_path))
    assert not info.value.retryable
    assert not marker.exists() and [p.name for p in agents.iterdir()] == [planted.name]


def test_an_agent_already_on_the_host_is_reused_without_uploading_it_again(
    make_hosts: MakeHosts, ssh_lab: SshLab, tmp_path: Path
) -> None:
    agents = tmp_path / "agents"
    plan, dest = small_package(ssh_lab.a, tmp_path)
    first = make_hosts(remote_dir=str(agents))
    archive.discard(first, archive.assemble(first, plan, dest))
    first.close()
    [agent] = agents.iterdir()
    uploaded = agent.stat()
    assert stat.S_IMODE(agents.stat().st_mode) == 0o700
    built = archive.assemble(make_hosts(remote_dir=str(agents)), plan, dest)
    assert_built_over_ssh(built, ssh_lab.a, {"a.dat": b"abc"})
    assert list(agents.iterdir()) == [agent]
    assert (agent.stat().st_ino, agent.stat().st_mtime_ns) == (
        uploaded.st_ino,
        uploaded.st_mtime_ns,
    )


def test_a_key_the_host_does_not_accept_is_an_authentication_error(
    make_hosts: MakeHosts, ssh_lab: SshLab, tmp_path: Path
) -> None:
    keygen(tmp_path / "stranger")
    hosts = make_hosts(key_filename=str(tmp_path / "stranger"))
    plan, dest = plan_for(
        ssh_lab.a.endpoint(tmp_path, "src"), ssh_lab.a.endpoint(tmp_path, "buf"), ()
    )
    with pytest.raises(AuthenticationFailedError, match="root could not log in") as info:
        archive.assemble(hosts, plan, dest)
    assert not info.value.retryable


def test_an_encrypted_key_works_with_its_passphrase_from_the_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    public = keygen(tmp_path / "locked", passphrase="correct horse")
    with running_sshd("127.0.0.5", tmp_path / "host", [public]) as server:
        (tmp_path / "known_hosts").write_text(server.known_hosts_line + "\n")
        write_tree(tmp_path / "src", {"a.dat": b"abc"})
        (tmp_path / "buf").mkdir()
        plan, dest = plan_for(
            server.endpoint(tmp_path / "src", "src"),
            server.endpoint(tmp_path / "buf", "buf"),
            (("a.dat", 3),),
        )
        monkeypatch.setenv("CCAT_SSH_KEY_FILE", str(tmp_path / "locked"))
        monkeypatch.setenv("CCAT_SSH_KNOWN_HOSTS", str(tmp_path / "known_hosts"))
        for passphrase in ("wrong", "correct horse"):
            monkeypatch.setenv("CCAT_SSH_KEY_PASSPHRASE", passphrase)
            hosts = AssemblyHosts()
            try:
                if passphrase == "wrong":
                    with pytest.raises(ConfigurationError, match="cannot load the SSH key"):
                        archive.assemble(hosts, plan, dest)
                    assert leftovers(tmp_path / "buf") == []
                else:
                    built = archive.assemble(hosts, plan, dest)
                    assert_built_over_ssh(built, server, {"a.dat": b"abc"})
            finally:
                hosts.close()


# Config files a worker may hold that Fabric or OpenSSH would read, each trying to change how
# hosts are reached: a ProxyCommand gateway (which would run), agent forwarding, another key.
# MARKER is where a file that was read leaves its trace.
PLANTED_CONFIGS = {
    "~/.fabric.py": '__import__("pathlib").Path("MARKER").touch()\n'
    'gateway = "touch MARKER"\nforward_agent = True\n',
    "~/.fabric.yaml": "gateway: touch MARKER\nforward_agent: true\n"
    "connect_kwargs:\n  key_filename: MARKER\n",
    "./fabric.yaml": "gateway: touch MARKER\n",
    "~/.ssh/config": "Host *\n  ProxyCommand touch MARKER\n  Port 1\n  User nobody\n",
}


@pytest.mark.parametrize("planted", PLANTED_CONFIGS)
def test_fabric_and_ssh_config_files_on_the_worker_change_nothing(
    make_hosts: MakeHosts,
    ssh_lab: SshLab,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    planted: str,
) -> None:
    """Only the ``CCAT_*`` settings decide how a host is reached: the system, user and project
    config files of Fabric and the user's ssh_config are not read (a ``.py`` one would run)."""
    home, cwd, marker = tmp_path / "home", tmp_path / "cwd", tmp_path / "read-it"
    cwd.mkdir()
    path = {"~": home, ".": cwd}[planted[0]] / planted[2:]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(PLANTED_CONFIGS[planted].replace("MARKER", str(marker)))
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    write_tree(tmp_path / "src", {"a.dat": b"abc"})
    (tmp_path / "buf").mkdir()
    plan, dest = plan_for(
        ssh_lab.a.endpoint(tmp_path / "src", "src"),
        ssh_lab.a.endpoint(tmp_path / "buf", "buf"),
        (("a.dat", 3),),
    )
    hosts = make_hosts()
    assert_built_over_ssh(archive.assemble(hosts, plan, dest), ssh_lab.a, {"a.dat": b"abc"})
    assert not marker.exists(), f"{planted} was read"


def test_an_unreachable_host_is_retryable(
    make_hosts: MakeHosts, ssh_lab: SshLab, tmp_path: Path
) -> None:
    closed = Endpoint(1, "src", "127.0.0.4", "root", free_port("127.0.0.4"), str(tmp_path))
    with pytest.raises(HostUnreachableError, match=r"location 'src' on 127\.0\.0\.4") as info:
        archive.assemble(make_hosts(), *plan_for(closed, closed, ()))
    assert info.value.retryable


@contextmanager
def tmpfs(mount: Path, size: str) -> Iterator[Path]:
    mount.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


@pytest.mark.parametrize("buffer_at", ["a", "b"])
def test_not_enough_space_at_the_buffer_is_a_clear_error(
    ssh_lab: SshLab, hosts: AssemblyHosts, tmp_path: Path, buffer_at: str
) -> None:
    write_tree(tmp_path / "src", {"big.dat": os.urandom(3 << 20)})
    server = ssh_lab.a if buffer_at == "a" else ssh_lab.b
    with tmpfs(tmp_path / "small_disk", "2m") as small_disk:
        plan, dest = plan_for(
            ssh_lab.a.endpoint(tmp_path / "src", "src"),
            server.endpoint(small_disk, "small_buffer"),
            (("big.dat", 3 << 20),),
        )
        with pytest.raises(
            InsufficientSpaceError, match=r"not enough space in .*small_disk"
        ) as info:
            archive.assemble(hosts, plan, dest)
        assert "location 'small_buffer'" in str(info.value)
        assert not info.value.retryable
        assert eventually(lambda: leftovers(small_disk) == [])


@pytest.mark.parametrize("buffer_at", ["a", "b"])
def test_space_reserved_at_the_buffer_by_another_package_is_retryable_and_named(
    ssh_lab: SshLab, hosts: AssemblyHosts, tmp_path: Path, buffer_at: str
) -> None:
    """Built in place on the source's host or received from it on another: the agent there
    sees the reservation of a package this process is writing into the buffer."""
    write_tree(tmp_path / "src", {"big.dat": os.urandom(3 << 20)})
    server = ssh_lab.a if buffer_at == "a" else ssh_lab.b
    with tmpfs(tmp_path / "small_disk", "4m") as small_disk:
        plan, dest = plan_for(
            ssh_lab.a.endpoint(tmp_path / "src", "src"),
            server.endpoint(small_disk, "small_buffer"),
            (("big.dat", 3 << 20),),
        )
        with (
            tar_agent._temporary_archive(str(small_disk), "other/held.tar", 3 << 20),
            pytest.raises(SpaceReservedError, match=r"reserved by other/held\.tar \(") as info,
        ):
            archive.assemble(hosts, plan, dest)
        assert "location 'small_buffer'" in str(info.value)
        assert info.value.retryable
        assert eventually(lambda: not list(small_disk.rglob(".pkg.tar.partial.*")))


def sparse_tree(root: Path, files: int, size: int) -> tuple[tuple[str, int], ...]:
    """Large files that cost no disk space: reading them is fast, so the archive is written
    at full speed."""
    root.mkdir(parents=True)
    for i in range(files):
        with open(root / f"frame_{i}.dat", "wb") as handle:
            handle.truncate(size)
    return tuple((f"frame_{i}.dat", size) for i in range(files))


@dataclass
class Crashable:
    server: SshServer
    hosts: AssemblyHosts


@pytest.fixture
def crashable(ssh_lab: SshLab, make_hosts: MakeHosts, tmp_path: Path) -> Iterator[Crashable]:
    """A host of its own (127.0.0.6) that a test may crash."""
    public = ssh_lab.client_key.with_suffix(".pub").read_text()
    with running_sshd("127.0.0.6", tmp_path / "crash_host", [public]) as server:
        known_hosts = tmp_path / "known_hosts"
        known_hosts.write_text(f"{server.known_hosts_line}\n{ssh_lab.b.known_hosts_line}\n")
        yield Crashable(server, make_hosts(known_hosts=str(known_hosts)))


CRASHES = {
    "building in place on the crashed host": ("crash", "crash"),
    "sending from the crashed host to this machine": ("crash", "local"),
    "receiving on the crashed host from this machine": ("local", "crash"),
}


@pytest.mark.parametrize("crash", CRASHES)
def test_sshd_crash_mid_assembly_is_retryable_and_leaves_nothing_running_or_written(
    crashable: Crashable, tmp_path: Path, crash: str
) -> None:
    source_at, buffer_at = CRASHES[crash]
    members = sparse_tree(tmp_path / "src", files=4, size=1 << 30)
    with tmpfs(tmp_path / "buffer", "5g") as buffer:
        crashed = crashable.server

        def endpoint(at: str, root: Path, name: str) -> Endpoint:
            return local(root, name) if at == "local" else crashed.endpoint(root, name)

        plan, dest = plan_for(
            endpoint(source_at, tmp_path / "src", "src"),
            endpoint(buffer_at, buffer, "buf"),
            members,
        )
        outcome: list[BaseException | AssembledArchive] = []

        def assemble() -> None:
            try:
                outcome.append(archive.assemble(crashable.hosts, plan, dest))
            except BaseException as exc:
                outcome.append(exc)

        worker = threading.Thread(target=assemble)
        worker.start()
        partial = buffer / "site" / "eou1"
        assert eventually(
            lambda: any(p.stat().st_size > 0 for p in partial.glob(".pkg.tar.partial.*")), 30
        ), "the archive was never started"
        crashed.crash()
        worker.join(60)

        [error] = outcome
        assert isinstance(error, RetryableError), error
        assert eventually(lambda: leftovers(buffer) == []), leftovers(buffer)
        assert eventually(lambda: remote_agents(crashed) == []), remote_agents(crashed)
        assert not (partial / "pkg.tar").exists()


def test_one_connection_per_host_is_reused_across_steps(
    ssh_lab: SshLab, hosts: AssemblyHosts, corpus: Corpus, tmp_path: Path
) -> None:
    def connections() -> int:
        """This process's established connections to the two hosts (others' come and go)."""
        ports = f"( dport = :{ssh_lab.a.port} or dport = :{ssh_lab.b.port} )"
        listing = subprocess.run(
            ["ss", "-Htnp", "state", "established", ports], capture_output=True, text=True
        )
        mine = f"pid={os.getpid()},"
        return sum(1 for line in listing.stdout.splitlines() if mine in line)

    before = connections()
    plan, dest = plan_for(
        ssh_lab.a.endpoint(corpus.root, "src"), ssh_lab.b.endpoint(tmp_path, "buf"), corpus.members
    )
    built = archive.assemble(hosts, plan, dest)
    archive.verify(hosts, plan, built)
    archive.discard(hosts, built)
    assert not Path(built.temp_path).exists()
    again = archive.assemble(hosts, plan, dest)
    assert again.checksum == built.checksum and Path(again.temp_path).stat().st_size == built.size
    assert built.via_ssh and again.via_ssh
    assert connections() - before == 2
    hosts.close()
    assert eventually(lambda: connections() == before)


def test_a_missing_key_file_is_a_configuration_error(
    make_hosts: MakeHosts, ssh_lab: SshLab, tmp_path: Path
) -> None:
    hosts = make_hosts(key_filename=str(tmp_path / "missing"))
    plan, dest = plan_for(
        ssh_lab.a.endpoint(tmp_path, "src"), ssh_lab.a.endpoint(tmp_path, "buf"), ()
    )
    with pytest.raises(
        ConfigurationError, match=r"cannot load the SSH key file .*FileNotFoundError"
    ):
        archive.assemble(hosts, plan, dest)


def test_errors_name_location_and_host(
    ssh_lab: SshLab, hosts: AssemblyHosts, tmp_path: Path
) -> None:
    plan, dest = plan_for(
        ssh_lab.a.endpoint(tmp_path / "nowhere", "src"), ssh_lab.a.endpoint(tmp_path, "buf"), ()
    )
    with pytest.raises(PackagingError, match=r"location 'src' on 127\.0\.0\.2: source root"):
        archive.assemble(hosts, plan, dest)


def test_paramiko_starts_no_key_exchange_within_a_package(
    hosts: AssemblyHosts,
    ssh_lab: SshLab,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """paramiko re-keys every 512 MiB (here: every 4 MiB) and deadlocks when the agent's
    channel closes during that exchange, so our connections leave re-keying to the server."""
    monkeypatch.setattr(paramiko.Packetizer, "REKEY_BYTES", 4 << 20)
    members = sparse_tree(tmp_path / "src", files=4, size=16 << 20)
    (tmp_path / "buf").mkdir()
    plan, dest = plan_for(
        ssh_lab.a.endpoint(tmp_path / "src", "src"), local(tmp_path / "buf"), members
    )
    with caplog.at_level(logging.DEBUG, logger="paramiko.transport"):
        built = archive.assemble(hosts, plan, dest)
    assert built.size > 64 << 20
    assert [r.message for r in caplog.records if "Rekeying" in r.message] == []


class _FlippingSender:
    """A sender whose first block of more than 1000 bytes reaches the receiver with one bit
    flipped; ``flipped`` records that it happened."""

    def __init__(self, sender: AgentProcess, flipped: list[int]) -> None:
        self._sender = sender
        self._flipped = flipped

    def read(self, size: int) -> bytes:
        block = self._sender.read(size)
        if len(block) > 1000 and not self._flipped:
            self._flipped.append(1000)
            block = block[:1000] + bytes([block[1000] ^ 0x01]) + block[1001:]
        return block

    def __getattr__(self, name: str) -> object:
        return getattr(self._sender, name)


def flip_one_bit_in_transit(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """From now on the worker flips one bit of the first archive it streams between hosts
    (the real agents send and receive); the list says where, once it has."""
    flipped: list[int] = []
    pump = archive._pump

    def flipping_pump(sender: AgentProcess, receiver: AgentProcess, need: int) -> None:
        pump(_FlippingSender(sender, flipped), receiver, need)  # type: ignore[arg-type]

    monkeypatch.setattr(archive, "_pump", flipping_pump)
    return flipped


STREAMS = {
    "ssh host to another ssh host": ("a", "b"),
    "ssh host to this machine": ("a", "local"),
    "this machine to an ssh host": ("local", "b"),
}


@pytest.mark.parametrize("stream", STREAMS)
def test_a_byte_flipped_in_transit_fails_and_the_buffer_keeps_nothing(
    ssh_lab: SshLab,
    hosts: AssemblyHosts,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    stream: str,
) -> None:
    """Only the receiver can notice damage on the way (the worker's copy, a network card):
    it compares what it wrote with the sender's checksum and keeps nothing if they differ.
    The real agents run on the real hosts; this worker flips one bit as it passes a block on."""
    source_at, buffer_at = STREAMS[stream]
    servers = {"a": ssh_lab.a, "b": ssh_lab.b}

    def endpoint(at: str, root: Path, name: str) -> Endpoint:
        return local(root, name) if at == "local" else servers[at].endpoint(root, name)

    write_tree(tmp_path / "src", {"a.dat": os.urandom(3 << 20), "b.dat": os.urandom(10)})
    (tmp_path / "buffer").mkdir()
    plan, dest = plan_for(
        endpoint(source_at, tmp_path / "src", "src"),
        endpoint(buffer_at, tmp_path / "buffer", "buf"),
        (("a.dat", 3 << 20), ("b.dat", 10)),
    )
    flipped = flip_one_bit_in_transit(monkeypatch)
    with pytest.raises(ArchiveVerificationError, match="the sender's checksum was") as info:
        archive.assemble(hosts, plan, dest)
    assert flipped, "no block passed through this worker: nothing was streamed"
    assert not info.value.retryable
    assert eventually(lambda: leftovers(tmp_path / "buffer") == []), leftovers(tmp_path / "buffer")
    lab = (ssh_lab.a, ssh_lab.b)
    assert eventually(lambda: remote_agents(*lab) == []), remote_agents(*lab)
