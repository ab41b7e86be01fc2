"""Nothing lost, nothing doubled: crash windows, killed workers, races, full disks, splits."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import pytest
from sqlalchemy import select, text, update

from ccat_packaging.claiming import PackageLimits, claim_packages, split_into_parts
from ccat_packaging.definitions import defs
from ccat_packaging.discovery import GroupKey
from ccat_packaging.jobs import job_name
from ccat_packaging.models import LocationType, RawDataFile, RawDataPackage, Status
from ccat_packaging.registration import complete, mark_failed, record_checksum
from ccat_packaging_tests.dagster_helpers import evaluate_sensor, run_partition

MB = 1 << 20
LONG_AGO = datetime(2000, 1, 1, tzinfo=UTC)  # a heartbeat that stopped long ago


def _packages(world) -> list[RawDataPackage]:
    with world.session() as s:
        return list(s.scalars(select(RawDataPackage).order_by(RawDataPackage.part)))


def _leftovers(root: Path) -> list[str]:
    """Files in a buffer other than published archives and their lock files."""
    return sorted(
        p.name for p in root.rglob("*") if p.is_file() and not p.name.endswith((".tar", ".lock"))
    )


def _site(world, buffer_root: Path | None = None):
    site = world.site()
    src = world.location(site, "src", LocationType.SOURCE)
    buf = world.location(site, "buf", LocationType.BUFFER, root=buffer_root)
    group = world.group(src)
    key = f"src__eou{group.eou_id}__mod{group.module_id}"
    return site, src, buf, group, key


def _big_file(world, group, name: str, size: int) -> None:
    """Incompressible-looking but cheap to make: one random block repeated, not sparse."""
    block = os.urandom(4 * MB)
    path = world.root(group.location_id) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        for _ in range(size // len(block)):
            handle.write(block)
    world.file(group, name, write=False, size=size)


def _assert_completed_and_intact(world, buf: int, package: RawDataPackage) -> None:
    tar = world.root(buf) / package.relative_path
    assert package.status == Status.COMPLETED
    assert package.size == tar.stat().st_size
    digest = hashlib.sha256()
    with open(tar, "rb") as handle:
        while chunk := handle.read(8 * MB):
            digest.update(chunk)
    assert package.checksum == digest.hexdigest()


# --- packaging rules -------------------------------------------------------------------------


def test_split_is_deterministic_and_respects_both_caps() -> None:
    files = [(f"f{i:02d}", size) for i, size in enumerate([40, 30, 30, 100, 5, 5, 5, 5])]
    limits = PackageLimits(max_bytes=70, max_files=3)
    parts = split_into_parts(list(reversed(files)), limits)
    assert parts == split_into_parts(files, limits)
    assert [[n for n, _ in p] for p in parts] == [
        ["f00", "f01"],
        ["f02"],
        ["f03"],  # larger than the cap on its own: a part of its own, never split
        ["f04", "f05", "f06"],
        ["f07"],
    ]


def test_a_group_over_the_cap_becomes_numbered_parts_in_one_run(world, monkeypatch) -> None:
    monkeypatch.setenv("CCAT_PACKAGE_MAX_BYTES", str(25_000))
    _, _, buf, group, key = _site(world)
    names = [f"d{i % 3}/f{i:02d}.dat" for i in range(10)]
    for name in names:
        world.file(group, name, size=10_000)
    with dg.instance_for_test() as instance:
        assert run_partition(instance, key).success
    packages = _packages(world)
    assert [p.part for p in packages] == [1, 2, 3, 4, 5]
    seen: list[str] = []
    for package in packages:
        _assert_completed_and_intact(world, buf, package)
        with tarfile.open(world.root(buf) / package.relative_path) as archive:
            members = archive.getmembers()
        assert sum(m.size for m in members) <= 25_000
        seen += [m.name for m in members]
    assert sorted(seen) == sorted(names) and len(seen) == len(set(seen))


# --- state machine -----------------------------------------------------------------------------


def test_failure_never_overwrites_completion(world) -> None:
    _, _, buf, group, key = _site(world)
    world.file(group, "a.dat")
    with world.session() as s:
        [plan] = claim_packages(s, GroupKey.parse(key), PackageLimits(10**9, 100), "crashed-run")
        record_checksum(s, plan.package_id, 10240, "0" * 64, "sha256")
        complete(s, plan.package_id, buf)
    with world.session() as s:
        assert mark_failed(s, plan.package_id, "run-2", "late failure of a slower attempt") is False
    assert _packages(world)[0].status == Status.COMPLETED


def test_a_non_retryable_failure_marks_the_package_failed_once_with_its_reason(world) -> None:
    _, _, buf, group, key = _site(world)
    world.file(group, "ok.dat")
    world.file(group, "gone.dat")
    (world.root(group.location_id) / "gone.dat").unlink()
    with dg.instance_for_test() as instance:
        result = run_partition(instance, key)
    assert not result.success
    [package] = _packages(world)
    assert package.status == Status.FAILED
    assert package.retry_count == 0
    assert "SourceFileError" in (package.failure_reason or "")
    assert "gone.dat" in (package.failure_reason or "")
    assert _leftovers(world.root(buf)) == []
    retries = [
        e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_UP_FOR_RETRY
    ]
    assert retries == []


# --- crash windows -----------------------------------------------------------------------------


def test_rows_created_but_no_tar_resumes_the_same_package(world) -> None:
    _, _, buf, group, key = _site(world)
    world.file(group, "a.dat")
    with world.session() as s:  # the create step committed, then its process died long ago
        claim_packages(s, GroupKey.parse(key), PackageLimits(10**9, 100), "crashed-run")
        s.execute(update(RawDataPackage).values(updated_at=LONG_AGO))
    with dg.instance_for_test() as instance:
        assert run_partition(instance, key).success
    [package] = _packages(world)
    _assert_completed_and_intact(world, buf, package)


def test_a_half_written_tar_is_cleared_and_rebuilt(world) -> None:
    _, _, buf, group, key = _site(world)
    world.file(group, "a.dat", size=50_000)
    with world.session() as s:
        [plan] = claim_packages(s, GroupKey.parse(key), PackageLimits(10**9, 100), "crashed-run")
        s.execute(update(RawDataPackage).values(status=Status.IN_PROGRESS, updated_at=LONG_AGO))
    partial = world.root(buf) / Path(plan.relative_path).parent / f".{plan.name}.tar.partial.dead"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"x" * 1000)
    with dg.instance_for_test() as instance:
        assert run_partition(instance, key).success
    _assert_completed_and_intact(world, buf, _packages(world)[0])
    assert _leftovers(world.root(buf)) == []


def test_a_tar_renamed_before_the_database_recorded_it_converges(world) -> None:
    _, _, buf, group, key = _site(world)
    for i in range(3):
        world.file(group, f"f{i}.dat", size=20_000)
    with dg.instance_for_test() as instance:
        assert run_partition(instance, key).success
        first = _packages(world)[0]
        # Undo the last transaction: as if the process died right after the rename.
        with world.session() as s:
            s.execute(
                update(RawDataPackage).values(status=Status.IN_PROGRESS, checksum=None, size=None)
            )
        assert run_partition(instance, key).success
    [again] = _packages(world)
    assert (again.id, again.checksum, again.size) == (first.id, first.checksum, first.size)
    _assert_completed_and_intact(world, buf, again)
    assert _leftovers(world.root(buf)) == []


# --- real processes ----------------------------------------------------------------------------


def _spawn(home: Path, key: str, env_extra: dict[str, str] | None = None) -> subprocess.Popen:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "ccat_packaging_tests.run_partition_process", str(home), key],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def test_kill_9_during_assembly_is_recovered_by_the_sensor(world, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CCAT_STALE_AFTER_SECONDS", "2")
    _, _, buf, group, key = _site(world)
    for i in range(3):
        _big_file(world, group, f"big{i}.dat", 256 * MB)
    home = tmp_path / "dagster_home"
    home.mkdir()
    worker = _spawn(home, key)
    deadline = time.monotonic() + 120
    while not list(world.root(buf).rglob(".*.partial.*")):
        assert worker.poll() is None, worker.stderr.read() if worker.stderr else ""
        assert time.monotonic() < deadline, "assembly never started"
        time.sleep(0.01)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    [package] = _packages(world)
    assert package.status == Status.IN_PROGRESS
    assert not (world.root(buf) / package.relative_path).exists()  # nothing under a final name
    time.sleep(2.5)  # the heartbeat has stopped: the package is now stale
    with dg.DagsterInstance.from_config(str(home)) as instance:
        tick = evaluate_sensor("package_src_sensor", instance, world.url)
        [request] = tick.run_requests or []
        assert request.partition_key == key and ":resume:" in str(request.run_key)
        assert run_partition(instance, key).success
    [package] = _packages(world)
    _assert_completed_and_intact(world, buf, package)
    assert _leftovers(world.root(buf)) == []


def test_concurrent_runs_of_one_group_produce_one_package(world, tmp_path) -> None:
    _, _, buf, group, key = _site(world)
    for i in range(4):
        _big_file(world, group, f"f{i}.dat", 16 * MB)
    home = tmp_path / "dagster_home"
    home.mkdir()
    with dg.DagsterInstance.from_config(str(home)) as instance:
        instance.add_dynamic_partitions("src_file_groups", [key])
    workers = [_spawn(home, key) for _ in range(3)]
    for worker in workers:
        assert worker.wait(timeout=300) == 0, worker.stderr.read() if worker.stderr else ""
    [package] = _packages(world)
    _assert_completed_and_intact(world, buf, package)
    assert _leftovers(world.root(buf)) == []
    with world.session() as s:
        assert {f.raw_data_package_id for f in s.scalars(select(RawDataFile))} == {package.id}


def test_database_connections_terminated_mid_run_are_survived(world, pg_admin, monkeypatch) -> None:
    monkeypatch.setenv("CCAT_RETRY_BASE_SECONDS", "0")
    monkeypatch.setenv("CCAT_STALE_AFTER_SECONDS", "1")  # heartbeat every 0.25 s
    _, _, buf, group, key = _site(world)
    for i in range(3):
        _big_file(world, group, f"f{i}.dat", 256 * MB)
    db_name = world.url.rsplit("/", 1)[1]
    killed: list[int] = []

    def terminate_once_assembly_runs() -> None:
        deadline = time.monotonic() + 120
        while not list(world.root(buf).rglob(".*.partial.*")) and time.monotonic() < deadline:
            time.sleep(0.005)
        for _ in range(3):
            with pg_admin.connect() as conn:
                rows = conn.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = :d AND pid <> pg_backend_pid()"
                    ),
                    {"d": db_name},
                ).all()
            killed.extend(1 for r in rows if r[0])
            time.sleep(0.3)

    job = defs().resolve_job_def(job_name("src"))
    thread = threading.Thread(target=terminate_once_assembly_runs)
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("src_file_groups", [key])
        thread.start()
        result = job.execute_in_process(instance=instance, partition_key=key, raise_on_error=False)
        thread.join()
    assert killed, "no connection was terminated: the test did not test anything"
    assert result.success
    _assert_completed_and_intact(world, buf, _packages(world)[0])


# --- buffers -----------------------------------------------------------------------------------


def test_disk_full_during_the_write_fails_over_to_the_next_buffer(world, small_disk) -> None:
    site, _, _, group, key = _site(world, buffer_root=small_disk)
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
    stop.set()
    filler.join()
    assert result.success
    [package] = _packages(world)
    _assert_completed_and_intact(world, spare, package)
    assert _leftovers(small_disk) == ["filler"]
    [event] = [
        e
        for e in result.all_events
        if e.event_type == dg.DagsterEventType.STEP_OUTPUT
        and str(e.step_key).startswith("assemble_tar")
    ]
    metadata = event.step_output_data.metadata
    assert metadata["buffer_location"].value == "spare"
    assert metadata["failover"].value is True


def test_no_buffer_with_room_fails_cleanly_naming_the_buffers(world, small_disk) -> None:
    _, _, _, group, key = _site(world, buffer_root=small_disk)
    world.file(group, "a.dat", size=80 << 20)
    with dg.instance_for_test() as instance:
        assert not run_partition(instance, key).success
    [package] = _packages(world)
    assert package.status == Status.FAILED
    assert "InsufficientSpaceError" in (package.failure_reason or "")
    assert "buf" in (package.failure_reason or "")
    assert _leftovers(small_disk) == []


@pytest.mark.parametrize("state", ["inactive", "full"])
def test_an_unusable_primary_buffer_is_passed_over(world, small_disk, state: str) -> None:
    site, _, buf, group, key = _site(world, buffer_root=small_disk)
    spare = world.location(site, "spare", LocationType.BUFFER, priority=2)
    world.file(group, "a.dat", size=(80 << 20) if state == "full" else 1000)
    if state == "inactive":
        with world.session() as s:
            s.execute(text("UPDATE data_location SET active = false WHERE id = :i"), {"i": buf})
    with dg.instance_for_test() as instance:
        assert run_partition(instance, key).success
    _assert_completed_and_intact(world, spare, _packages(world)[0])


# --- source integrity and retries ---------------------------------------------------------------


def test_a_source_file_altered_since_filing_fails_the_package_at_once(world) -> None:
    _, src, buf, group, key = _site(world)
    world.file(group, "ok.dat", size=5000)
    content = world.file_bytes(group, "tampered.dat", size=5000)
    (world.root(src) / "tampered.dat").write_bytes(content[::-1])  # same size, other bytes
    with dg.instance_for_test() as instance:
        result = run_partition(instance, key)
    assert not result.success
    [package] = _packages(world)
    assert package.status == Status.FAILED and package.retry_count == 0
    assert "altered since filing" in (package.failure_reason or "")
    assert "tampered.dat" in (package.failure_reason or "")
    assert _leftovers(world.root(buf)) == []


def _retries(result: dg.ExecuteInProcessResult) -> int:
    return sum(
        1 for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_UP_FOR_RETRY
    )


def test_retryable_errors_retry_three_times_then_fail_exactly_once(world, monkeypatch) -> None:
    monkeypatch.setenv("CCAT_RETRY_BASE_SECONDS", "0")
    _, src, buf, group, key = _site(world)
    content = world.file_bytes(group, "growing.dat", size=10_000)
    (world.root(src) / "growing.dat").write_bytes(content[:4000])  # the instrument still writes
    with dg.instance_for_test() as instance:
        result = run_partition(instance, key)
    assert not result.success
    assert _retries(result) == 3
    [package] = _packages(world)
    assert package.status == Status.FAILED
    assert package.retry_count == 3
    assert (package.failure_reason or "").startswith(
        "gave up after 4 attempts: SourceNotReadyError"
    )
    assert _leftovers(world.root(buf)) == []


def test_a_retry_that_succeeds_completes_the_package(world, monkeypatch) -> None:
    monkeypatch.setenv("CCAT_RETRY_BASE_SECONDS", "1")
    _, src, buf, group, key = _site(world)
    content = world.file_bytes(group, "growing.dat", size=10_000)
    path = world.root(src) / "growing.dat"
    path.write_bytes(content[:4000])

    def finish_writing_after_the_first_failure() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            packages = _packages(world)
            if packages and packages[0].retry_count >= 1:
                path.write_bytes(content)
                return
            time.sleep(0.05)

    writer = threading.Thread(target=finish_writing_after_the_first_failure)
    writer.start()
    with dg.instance_for_test() as instance:
        result = run_partition(instance, key)
    writer.join()
    assert result.success
    assert _retries(result) >= 1
    [package] = _packages(world)
    _assert_completed_and_intact(world, buf, package)
    assert package.retry_count == _retries(result)
    assert package.failure_reason is None
