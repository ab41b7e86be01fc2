"""Which buffer takes a package: the preference rule, failover as plain Python, and failover
in real runs into a buffer that fills up or is switched off."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import dagster as dg
import pytest
from sqlalchemy import text, update

from ccat_packaging.assembly import archive
from ccat_packaging.buffer_choice import assemble_at_first_usable_buffer, primary_buffer
from ccat_packaging.errors import HostUnreachableError, NoActiveBufferError
from ccat_packaging.models import DataLocation, LocationType, Status
from ccat_packaging.names import BUFFER_LOCATION_TAG
from ccat_packaging.plans import Endpoint, PackagePlan
from ccat_packaging.resources import AssemblyHosts
from ccat_packaging_tests.dagster_helpers import op_of, run_partition
from ccat_packaging_tests.package_checks import (
    MB,
    assert_completed_and_intact,
    big_file,
    leftovers,
    packages_of,
    single_site,
)
from ccat_packaging_tests.sshd import free_port

SOURCE, BUFFER = LocationType.SOURCE, LocationType.BUFFER


def test_primary_buffer_is_lowest_priority_number_then_lowest_id(world) -> None:
    site = world.site()
    world.location(site, "b_prio2", BUFFER, priority=2)
    first_p1 = world.location(site, "b_prio1_a", BUFFER, priority=1)
    world.location(site, "b_prio1_b", BUFFER, priority=1)
    world.location(site, "b_inactive_p0", BUFFER, priority=0, active=False)
    other_site = world.site("cologne")
    world.location(other_site, "cologne_b", BUFFER, priority=0)
    with world.session() as s:
        assert primary_buffer(s, site).id == first_p1
        s.execute(update(DataLocation).where(DataLocation.id == first_p1).values(active=False))
        assert primary_buffer(s, site).name == "b_prio1_b"


def test_no_active_buffer_is_an_error_naming_the_site(world) -> None:
    site = world.site()
    world.location(site, "src", SOURCE)
    world.location(site, "off", BUFFER, active=False)
    with world.session() as s, pytest.raises(NoActiveBufferError, match="no active BUFFER"):
        primary_buffer(s, site)


# --- failover without Dagster ------------------------------------------------------------------


@pytest.fixture
def no_known_hosts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty known-hosts file of the service's own: the hosts here never answer, so none
    is known (a missing file would be refused before any connection is tried)."""
    known_hosts = tmp_path / "known_hosts"
    known_hosts.touch(mode=0o600)
    monkeypatch.setenv("CCAT_SSH_KNOWN_HOSTS", str(known_hosts))


def _endpoint(location_id: int, name: str, host: str, root: Path, port: int = 22) -> Endpoint:
    root.mkdir(parents=True, exist_ok=True)
    return Endpoint(location_id, name, host, "root", port, str(root))


def _plan(source: Endpoint, tmp_path: Path) -> PackagePlan:
    (Path(source.root) / "a.dat").write_bytes(b"a" * 3000)
    return PackagePlan(1, "pkg", "grp", 1, "site/eou1/pkg.tar", source, 1, (("a.dat", 3000),))


def test_an_unreachable_buffer_host_is_passed_over_for_the_next_buffer(
    tmp_path: Path, no_known_hosts: None
) -> None:
    source = _endpoint(1, "src", "localhost", tmp_path / "src")
    closed = _endpoint(2, "far", "127.0.0.6", tmp_path / "far", free_port("127.0.0.6"))
    spare = _endpoint(3, "spare", "localhost", tmp_path / "spare")
    plan = _plan(source, tmp_path)
    passed_over: list[str] = []
    hosts = AssemblyHosts()
    built = assemble_at_first_usable_buffer(hosts, plan, [closed, spare], passed_over.append)
    try:
        assert built.buffer == spare
        assert Path(built.temp_path).parent.is_relative_to(tmp_path / "spare")
    finally:
        archive.discard(hosts, built)
        hosts.close()
    [why] = passed_over
    assert why.startswith("buffer far unusable:") and "127.0.0.6" in why


def test_no_reachable_buffer_is_retryable_not_a_lack_of_space(
    tmp_path: Path, no_known_hosts: None
) -> None:
    """The only buffer's host is down: the package waits for it through the op retries
    instead of failing for good as if the buffer were full."""
    source = _endpoint(1, "src", "localhost", tmp_path / "src")
    closed = _endpoint(2, "far", "127.0.0.6", tmp_path / "far", free_port("127.0.0.6"))
    passed: list[str] = []
    hosts = AssemblyHosts()
    with pytest.raises(HostUnreachableError, match=r"no active buffer .* now: far: .*127\.0\.0\.6"):
        assemble_at_first_usable_buffer(hosts, _plan(source, tmp_path), [closed], passed.append)
    hosts.close()
    assert len(passed) == 1 and leftovers(tmp_path / "far") == []


def test_an_unreachable_source_host_is_not_a_reason_to_fail_over(
    tmp_path: Path, no_known_hosts: None
) -> None:
    source = _endpoint(1, "src", "127.0.0.7", tmp_path / "src", free_port("127.0.0.7"))
    first = _endpoint(2, "buf", "localhost", tmp_path / "buf")
    spare = _endpoint(3, "spare", "localhost", tmp_path / "spare")
    passed_over: list[str] = []
    hosts = AssemblyHosts()
    with pytest.raises(HostUnreachableError, match=r"127\.0\.0\.7"):
        assemble_at_first_usable_buffer(
            hosts, _plan(source, tmp_path), [first, spare], passed_over.append
        )
    hosts.close()
    assert passed_over == []
    assert leftovers(tmp_path / "buf") == [] and leftovers(tmp_path / "spare") == []


# --- failover in real runs ---------------------------------------------------------------------


def test_disk_full_during_the_write_fails_over_to_the_next_buffer(world, small_disk) -> None:
    site, _, _, group, key = single_site(world, buffer_root=small_disk)
    spare = world.location(site, "spare", LocationType.BUFFER, priority=2)
    world.file(group, "a.dat", size=48 << 20)  # fits the 64 MiB disk when checked...
    stop = threading.Event()

    def fill_disk_once_writing_starts() -> None:  # ...until someone else fills it
        while not stop.is_set():
            if list(small_disk.rglob(".*.partial.*")):
                with open(small_disk / "filler", "wb") as handle, contextlib.suppress(OSError):
                    handle.write(b"\0" * (64 << 20))
                return
            time.sleep(0.0002)

    filler = threading.Thread(target=fill_disk_once_writing_starts)
    filler.start()
    with dg.instance_for_test() as instance:
        result = run_partition(instance, key)
        run = instance.get_run_by_id(result.run_id)
    stop.set()
    filler.join()
    assert result.success
    assert run is not None and run.tags[BUFFER_LOCATION_TAG] == "spare"  # not the guess "buf"
    [package] = packages_of(world)
    assert_completed_and_intact(world, spare, package)
    assert leftovers(small_disk) == ["filler"]
    [event] = [
        e
        for e in result.all_events
        if e.event_type == dg.DagsterEventType.STEP_OUTPUT and op_of(e.step_key) == "assemble_tar"
    ]
    metadata = event.step_output_data.metadata
    assert metadata["buffer_location"].value == "spare"
    assert metadata["failover"].value is True


def test_no_buffer_with_room_fails_cleanly_naming_the_buffers(world, small_disk) -> None:
    _, _, _, group, key = single_site(world, buffer_root=small_disk)
    world.file(group, "a.dat", size=80 << 20)
    with dg.instance_for_test() as instance:
        assert not run_partition(instance, key).success
    [package] = packages_of(world)
    assert package.status == Status.FAILED
    assert "InsufficientSpaceError" in (package.failure_reason or "")
    assert "buf" in (package.failure_reason or "")
    assert leftovers(small_disk) == []


@pytest.mark.parametrize("state", ["inactive", "full"])
def test_an_unusable_primary_buffer_is_passed_over(world, small_disk, state: str) -> None:
    site, _, buf, group, key = single_site(world, buffer_root=small_disk)
    spare = world.location(site, "spare", LocationType.BUFFER, priority=2)
    world.file(group, "a.dat", size=(80 << 20) if state == "full" else 1000)
    if state == "inactive":
        with world.session() as s:
            s.execute(text("UPDATE data_location SET active = false WHERE id = :i"), {"i": buf})
    with dg.instance_for_test() as instance:
        assert run_partition(instance, key).success
    assert_completed_and_intact(world, spare, packages_of(world)[0])


# --- concurrent runs into a small buffer: real processes -----------------------------------------


def _two_groups(world, small_disk: Path) -> tuple[int, int, str, str]:
    """(site, buffer, key of a, key of b): two groups of one source, each a package of ~40 MiB
    in two members, and a 64 MiB primary buffer that takes one of them at a time."""
    site, src, buf, group_a, key_a = single_site(world, buffer_root=small_disk)
    group_b = world.group(src)
    key_b = f"src__eou{group_b.eou_id}__mod{group_b.module_id}"
    for group, name in ((group_a, "a"), (group_b, "b")):
        for i in (1, 2):
            big_file(world, group, f"{name}{i}.dat", 20 * MB)
    return site, buf, key_a, key_b


class _Runs:
    """Packaging runs in processes of their own on one Dagster home; the first one ``held``
    after its first member is written into the buffer (``held_writer``) until ``go``."""

    def __init__(self, tmp_path: Path, *keys: str) -> None:
        self.tmp = tmp_path
        self.home = tmp_path / "dagster_home"
        self.home.mkdir()
        self.hold = tmp_path / "hold"
        self.hold.mkdir()
        with dg.DagsterInstance.from_config(str(self.home)) as instance:
            instance.add_dynamic_partitions("src_file_groups", list(keys))

    def start(self, key: str, held: bool = False, **env: str) -> subprocess.Popen:
        how = ["held_writer", str(self.hold), "run"] if held else ["run_partition_process"]
        command = [sys.executable, "-m", f"ccat_packaging_tests.{how[0]}", *how[1:]]
        with open(self.tmp / f"{key}.log", "wb") as log:
            return subprocess.Popen(
                [*command, str(self.home), key],
                env={**os.environ, **env},
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def log(self, key: str) -> str:
        return (self.tmp / f"{key}.log").read_text(errors="replace")[-3000:]

    def until(self, condition: Callable[[], bool], key: str, run: subprocess.Popen, what: str):
        deadline = time.monotonic() + 120
        while not condition():
            assert run.poll() is None, f"{what}; the run ended: {self.log(key)}"
            assert time.monotonic() < deadline, f"{what} within 120 s: {self.log(key)}"
            time.sleep(0.05)

    def messages(self) -> dict[str, str]:
        """Every run's log messages, by partition."""
        with dg.DagsterInstance.from_config(str(self.home)) as instance:
            return {
                run.tags["dagster/partition"]: "\n".join(
                    e.user_message for e in instance.all_logs(run.run_id)
                )
                for run in instance.get_runs()
            }


def _package(world, key: str):
    return {p.name.split("__part")[0]: p for p in packages_of(world)}.get(key)


def test_concurrent_runs_into_a_buffer_too_small_for_both_fail_over_before_writing(
    world, small_disk: Path, tmp_path: Path
) -> None:
    site, buf, key_a, key_b = _two_groups(world, small_disk)
    spare = world.location(site, "spare", LocationType.BUFFER, priority=2)
    runs = _Runs(tmp_path, key_a, key_b)
    first = runs.start(key_a, held=True)
    runs.until((runs.hold / "held").exists, key_a, first, "the first run never wrote")

    second = runs.start(key_b)
    assert second.wait(timeout=300) == 0, runs.log(key_b)
    (runs.hold / "go").touch()
    assert first.wait(timeout=300) == 0, runs.log(key_a)

    messages = runs.messages()
    assert not [key for key, text in messages.items() if "[ENOSPC]" in text]
    a, b = _package(world, key_a), _package(world, key_b)
    assert a is not None and b is not None
    assert f"reserved by {a.relative_path} (" in messages[key_b]
    assert_completed_and_intact(world, buf, a)
    assert_completed_and_intact(world, spare, b)
    assert leftovers(small_disk) == [] and leftovers(world.root(spare)) == []


@pytest.mark.parametrize("first_run", ["completes", "is killed"])
def test_with_one_small_buffer_the_second_run_waits_for_the_first(
    world, small_disk: Path, tmp_path: Path, first_run: str
) -> None:
    """Retrying through the op retry policy: when the first package is done the buffer is
    really full and the second fails for that reason; when its run dies the second takes the
    space that run had reserved and written."""
    _, buf, key_a, key_b = _two_groups(world, small_disk)
    runs = _Runs(tmp_path, key_a, key_b)
    first = runs.start(key_a, held=True)
    runs.until((runs.hold / "held").exists, key_a, first, "the first run never wrote")
    second = runs.start(key_b, CCAT_RETRY_BASE_SECONDS="3")

    def waiting() -> bool:
        b = _package(world, key_b)
        return b is not None and "retrying after: SpaceReservedError" in (b.failure_reason or "")

    runs.until(waiting, key_b, second, "the second run never waited for the first")
    if first_run == "completes":
        (runs.hold / "go").touch()
        assert first.wait(timeout=300) == 0, runs.log(key_a)
    else:
        first.kill()
        first.wait(timeout=60)
    code = second.wait(timeout=300)

    a, b = _package(world, key_a), _package(world, key_b)
    assert a is not None and b is not None and b.retry_count >= 1
    if first_run == "completes":
        assert code == 1
        assert_completed_and_intact(world, buf, a)
        assert b.status == Status.FAILED
        assert "InsufficientSpaceError: no active buffer" in (b.failure_reason or "")
        assert "not enough space" in (b.failure_reason or "")
    else:
        assert code == 0, runs.log(key_b)
        assert_completed_and_intact(world, buf, b)
        assert a.status == Status.IN_PROGRESS  # its run died: the sensor resumes it later
    messages = runs.messages()
    assert f"reserved by {a.relative_path} (" in messages[key_b]
    assert not [key for key, text in messages.items() if "[ENOSPC]" in text]
    assert leftovers(small_disk) == []
