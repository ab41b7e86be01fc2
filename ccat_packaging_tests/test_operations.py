"""Operator tools: status, dry-run, requeueing a failed package after the cause is fixed, and
verifying a package at rest."""

from __future__ import annotations

import hashlib
import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.remote_origin import (
    InProcessCodeLocationOrigin,
    LoadableTargetOrigin,
    RemoteRepositoryOrigin,
)
from dagster._core.scheduler.instigation import InstigatorState, InstigatorStatus, InstigatorType
from dagster._daemon.types import DaemonHeartbeat
from sqlalchemy import select, update

from ccat_packaging import operations
from ccat_packaging.claiming import PackageLimits, claim_packages
from ccat_packaging.cli import main
from ccat_packaging.discovery import GroupKey
from ccat_packaging.models import (
    DiskDataLocation,
    LocationType,
    RawDataFile,
    RawDataPackage,
    Status,
)
from ccat_packaging.resources import HostReach
from ccat_packaging_tests.dagster_helpers import evaluate_sensor, run_partition
from ccat_packaging_tests.sshd import free_port


def test_status_and_dry_run_report_the_backlog_without_changing_it(world, capsys) -> None:
    site = world.site()
    src = world.location(site, "src", LocationType.SOURCE)
    world.location(site, "buf", LocationType.BUFFER)
    g1, g2 = world.group(src), world.group(src)
    world.file(g1, "a.dat", size=100)
    world.file(g1, "b.dat", size=200)
    world.file(g2, "c.dat", size=300)
    with world.session() as s:
        [row] = operations.backlog(s)
        assert (row.location, row.files, row.bytes, row.packages_by_status) == ("src", 3, 600, {})
        assert row.oldest_filed_at is not None
        [dry] = operations.dry_run(s)
    assert dry.buffer == "buf" and dry.problem is None
    assert sorted(files for _, files, _ in dry.groups) == [1, 2]
    assert main(["dry-run"]) == 0
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert f"src__eou{g1.eou_id}__mod{g1.module_id}" in out and "-> buffer buf" in out
    with world.session() as s:
        assert s.query(RawDataPackage).count() == 0


def test_dry_run_names_the_packages_a_sensor_would_resume_and_why(world, capsys) -> None:
    site = world.site()
    src = world.location(site, "src", LocationType.SOURCE)
    world.location(site, "buf", LocationType.BUFFER)
    requeued, died, live = world.group(src), world.group(src), world.group(src)
    with world.session() as s:
        for group, status, owner, age in [
            (requeued, Status.PENDING, None, timedelta(0)),
            (died, Status.IN_PROGRESS, "run-dead", timedelta(hours=2)),
            (live, Status.IN_PROGRESS, "run-live", timedelta(0)),
        ]:
            s.add(
                RawDataPackage(
                    name=f"src__eou{group.eou_id}__mod{group.module_id}__part001",
                    relative_path="x.tar",
                    status=status,
                    lease_owner=owner,
                    updated_at=datetime.now(UTC) - age,
                    source_location_id=src,
                    executed_obs_unit_id=group.eou_id,
                    instrument_module_id=group.module_id,
                )
            )
    assert main(["dry-run"]) == 0
    out = capsys.readouterr().out
    assert "src: 0 group(s), 2 package(s) to resume -> buffer buf" in out
    assert (
        f"  resume src__eou{requeued.eou_id}__mod{requeued.module_id}__part001\n"
        "    no run holds it: requeued by an operator, or released by an interrupted step\n"
    ) in out
    assert (
        f"  resume src__eou{died.eou_id}__mod{died.module_id}__part001\n"
        "    its run's heartbeat stopped 120 min ago (lease run-dead)\n"
    ) in out
    assert f"eou{live.eou_id}" not in out  # its run is alive
    assert max(len(line) for line in out.splitlines()) <= 100


def test_dry_run_names_a_missing_buffer(world, capsys) -> None:
    site = world.site()
    world.file(world.group(world.location(site, "src", LocationType.SOURCE)), "a.dat")
    assert main(["dry-run"]) == 1
    assert "ERROR: site 'ccat' has no active BUFFER" in capsys.readouterr().out


def test_a_requeued_package_is_rebuilt_by_the_next_sensor_run(world, capsys) -> None:
    site = world.site()
    src = world.location(site, "src", LocationType.SOURCE)
    world.location(site, "buf", LocationType.BUFFER)
    group = world.group(src)
    content = world.file_bytes(group, "a.dat")
    path = world.root(src) / "a.dat"
    path.unlink()  # the instrument computer lost the file...
    key = f"src__eou{group.eou_id}__mod{group.module_id}"
    with dg.instance_for_test() as instance:
        assert not run_partition(instance, key).success
        with world.session() as s:
            failed = s.query(RawDataPackage).one()
            assert failed.status == Status.FAILED
        # Failed packages are not retried behind the operator's back.
        assert not evaluate_sensor("package_src_sensor", instance).run_requests
        path.write_bytes(content)  # ...an operator restored it and requeues the package
        assert main(["requeue", "--package", failed.name]) == 0
        assert f"requeued {failed.name}" in capsys.readouterr().out
        [request] = evaluate_sensor("package_src_sensor", instance).run_requests or []
        assert request.partition_key == key
        assert run_partition(instance, key).success
    with world.session() as s:
        package = s.query(RawDataPackage).one()
        assert (package.status, package.retry_count, package.failure_reason) == (
            Status.COMPLETED,
            0,
            None,
        )


def test_requeue_refuses_unknown_names(world, capsys) -> None:
    world.location(world.site(), "src", LocationType.SOURCE)
    assert main(["requeue", "--package", "nope"]) == 1
    assert "no failed package named 'nope'" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["requeue", "--bogus"])


def _failed_package(world, monkeypatch, tmp_path: Path) -> str:
    """A failed package at ``src`` and a fresh Dagster instance at DAGSTER_HOME."""
    src = world.location(world.site(), "src", LocationType.SOURCE)
    group = world.group(src)
    with world.session() as s:
        s.add(
            RawDataPackage(
                name=f"{group_key(group)}__part001",
                relative_path="x.tar",
                status=Status.FAILED,
                failure_reason="gave up after 4 attempts: HostUnreachableError",
                source_location_id=src,
                executed_obs_unit_id=group.eou_id,
                instrument_module_id=group.module_id,
            )
        )
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    (tmp_path / "dagster_home").mkdir()
    return group_key(group)


def group_key(group) -> str:
    return f"src__eou{group.eou_id}__mod{group.module_id}"


def _start_sensor(name: str) -> None:
    """What the UI's toggle stores."""
    with dg.DagsterInstance.get() as instance:
        origin = RemoteRepositoryOrigin(
            InProcessCodeLocationOrigin(LoadableTargetOrigin(module_name="ccat_packaging")),
            "__repository__",
        ).get_instigator_origin(name)
        instance.add_instigator_state(
            InstigatorState(origin, InstigatorType.SENSOR, InstigatorStatus.RUNNING)
        )


def _daemon_heartbeat() -> None:
    """What a running dagster-daemon writes."""
    with dg.DagsterInstance.get() as instance:
        instance.add_daemon_heartbeat(DaemonHeartbeat(time.time(), "SENSOR", None, None))


def test_requeue_says_who_starts_the_runs(world, monkeypatch, tmp_path, capsys) -> None:
    key = _failed_package(world, monkeypatch, tmp_path)
    backfill = (
        f"  dagster job backfill -j package_src --partitions {key} -l ccat_packaging "
        "-w workspace.yaml --noprompt\n"
    )
    assert main(["requeue", "--all"]) == 0
    assert capsys.readouterr().out == (
        f"requeued {key}__part001\n1 package(s) requeued: pending, retry count 0\n"
        "sensor package_src_sensor is stopped: no run starts by itself; start it, or run:\n"
        + backfill
    )
    assert main(["requeue", "--all"]) == 0
    assert capsys.readouterr().out == (
        "nothing requeued: no package anywhere is failed "
        "(`ccat-packaging list --status failed` shows which are)\n"
    )
    assert main(["requeue", "--location", "src"]) == 0
    assert "nothing requeued: no package at location 'src' is failed" in capsys.readouterr().out
    with world.session() as s:
        s.query(RawDataPackage).update({"status": Status.FAILED})
    _start_sensor("package_src_sensor")
    assert main(["requeue", "--all"]) == 0
    out = capsys.readouterr().out
    assert "sensor package_src_sensor is started but no dagster-daemon ticks it; run:\n" in out
    assert out.endswith(backfill)
    with world.session() as s:
        s.query(RawDataPackage).update({"status": Status.FAILED})
    _daemon_heartbeat()
    assert main(["requeue", "--all"]) == 0
    assert capsys.readouterr().out.endswith(
        "sensor package_src_sensor is running: its next tick requests a run per group\n"
    )
    with world.session() as s:
        s.query(RawDataPackage).update({"status": Status.FAILED})
    monkeypatch.delenv("DAGSTER_HOME")
    assert main(["requeue", "--all"]) == 0
    assert capsys.readouterr().out.endswith(
        "DAGSTER_HOME is not set, so whether the sensor is started cannot be told; if it is, "
        "its next tick requests the runs, else run:\n" + backfill
    )


def _completed_package(world) -> tuple[RawDataPackage, Path]:
    site = world.site()
    src = world.location(site, "src", LocationType.SOURCE)
    buf = world.location(site, "buf", LocationType.BUFFER)
    group = world.group(src)
    world.file_bytes(group, "a.dat", size=300_000)
    with dg.instance_for_test() as instance:
        assert run_partition(instance, f"src__eou{group.eou_id}__mod{group.module_id}").success
    with world.session() as s:
        package = s.query(RawDataPackage).one()
    return package, world.root(buf) / package.relative_path


def test_verify_rehashes_a_package_at_its_buffer_and_names_a_mismatch(world, capsys) -> None:
    package, tar = _completed_package(world)
    assert main(["verify", package.name]) == 0
    out = capsys.readouterr().out
    assert f"OK {package.name} at buf ({tar})" in out
    assert f"sha256:{package.checksum}" in out
    data = bytearray(tar.read_bytes())
    data[1000] ^= 0xFF  # one flipped bit at rest, same size
    tar.write_bytes(bytes(data))
    assert main(["verify", package.name]) == 1
    out = capsys.readouterr().out
    assert f"MISMATCH {package.name}" in out
    assert f"found    {package.size} bytes sha256:{hashlib.sha256(data).hexdigest()}" in out
    tar.unlink()
    assert main(["verify", package.name]) == 1
    assert "No such file or directory" in capsys.readouterr().out


def test_verify_refuses_a_package_without_a_recorded_checksum(world, capsys) -> None:
    site = world.site()
    src = world.location(site, "src", LocationType.SOURCE)
    world.location(site, "buf", LocationType.BUFFER)
    group = world.group(src)
    world.file(group, "a.dat", write=False, size=10)  # filed, but missing on disk
    with dg.instance_for_test() as instance:
        run_partition(instance, f"src__eou{group.eou_id}__mod{group.module_id}")
    with world.session() as s:
        name = s.query(RawDataPackage).one().name
    assert main(["verify", name]) == 1
    assert "is failed: only completed packages have a recorded checksum" in (
        capsys.readouterr().out
    )
    assert main(["verify", "nope"]) == 1
    assert "no package named 'nope'" in capsys.readouterr().out


def test_list_shows_packages_of_every_status_and_filters_them(world, capsys) -> None:
    done, tar = _completed_package(world)
    with world.session() as s:
        src = s.scalars(select(DiskDataLocation).where(DiskDataLocation.name == "src")).one().id
    lost = world.group(src)
    world.file(lost, "lost.dat", write=False, size=1_300_000_000)  # filed, missing on disk
    with dg.instance_for_test() as instance:
        assert not run_partition(instance, f"src__eou{lost.eou_id}__mod{lost.module_id}").success
    with world.session() as s:
        failed = s.scalars(select(RawDataPackage).where(RawDataPackage.name != done.name)).one()
        failed.failure_reason = "source file missing: " + "x" * 200 + "\nsecond line"
        failed.updated_at = datetime.now(UTC) - timedelta(days=3)
        pending = world.group(src)
        s.add(
            RawDataPackage(
                name="src__pending__part001",
                relative_path="src/pending.tar",
                source_location_id=src,
                executed_obs_unit_id=pending.eou_id,
                instrument_module_id=pending.module_id,
            )
        )
        failed_name = failed.name
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    # Only a path, which must stay whole to be usable, may be wider than 100 columns.
    assert max(len(line) for line in lines if not line.startswith("    at ")) <= 100
    assert lines[0].split() == ["status", "files", "size", "age", "checksum", "name"]
    # Oldest change first: the failed one, stuck for three days.
    assert lines[1].split() == ["failed", "1", "-", "3.0d", "-", failed_name]
    assert lines[2] == "    at -"
    assert lines[3].startswith("    reason: source file missing: xxx") and lines[3].endswith("…")
    assert done.checksum is not None and done.size is not None
    assert f"sha256:{done.checksum[:12]}…" in out and f"    at {tar}" in out
    assert f"1 {done.size / 1000:.1f} kB" in " ".join(out.split())
    assert "src__pending__part001" in out and "3 package(s)" in out

    def names(*args: str) -> set[str]:
        assert main(["list", *args]) == 0
        listed = capsys.readouterr().out.splitlines()[1:-1]
        return {line.split()[-1] for line in listed if not line.startswith(" ")}

    assert names("--status", "failed") == {failed_name}
    assert main(["list", "--limit", "1"]) == 0
    assert "1 package(s) (the first 1: --limit); age" in capsys.readouterr().out
    assert names("--status", "completed", "--location", "src") == {done.name}
    assert names("--location", "buf") == {done.name}
    assert names("--older-than", "2d") == {failed_name}
    assert names("--older-than", "90m", "--status", "pending") == set()
    assert main(["list", "--location", "nope"]) == 1
    assert "no location named 'nope'" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["list", "--older-than", "soon"])
    # One file group's parts, whatever their status (what its asset partition summarises).
    with world.session() as s:
        lost_group = operations.list_packages(s, group=GroupKey("src", lost.eou_id, lost.module_id))
        pending_group = operations.list_packages(
            s, group=GroupKey("src", pending.eou_id, pending.module_id)
        )
    assert [p.name for p in lost_group] == [failed_name]
    assert [p.name for p in pending_group] == ["src__pending__part001"]


def _package(world, group, status: Status, age: timedelta, part: int = 1) -> None:
    with world.session() as s:
        s.add(
            RawDataPackage(
                name=f"eou{group.eou_id}__mod{group.module_id}__part{part:03d}",
                relative_path="x.tar",
                status=status,
                source_location_id=group.location_id,
                executed_obs_unit_id=group.eou_id,
                instrument_module_id=group.module_id,
                part=part,
                updated_at=datetime.now(UTC) - age,
            )
        )


def test_the_backlog_counts_waiting_files_their_age_and_the_last_hours_outcomes(world) -> None:
    site = world.site()
    src = world.location(site, "src", LocationType.SOURCE)
    world.location(site, "other", LocationType.SOURCE)
    world.location(site, "buf", LocationType.BUFFER)
    group = world.group(src)
    world.file(group, "a.dat", size=100, write=False)
    world.file(group, "b.dat", size=250, write=False)
    with world.session() as s:
        s.execute(
            update(RawDataFile)
            .where(RawDataFile.relative_path == "a.dat")
            .values(created_at=datetime.now(UTC) - timedelta(hours=2))
        )
    for part, (status, age) in enumerate(
        [
            (Status.COMPLETED, timedelta(minutes=5)),
            (Status.COMPLETED, timedelta(minutes=50)),
            (Status.COMPLETED, timedelta(hours=3)),
            (Status.FAILED, timedelta(minutes=10)),
            (Status.FAILED, timedelta(days=2)),
            (Status.PENDING, timedelta(minutes=1)),
        ],
        start=1,
    ):
        _package(world, world.group(src), status, age, part)
    with world.session() as s:
        rows = {row.location: row for row in operations.backlog(s)}
    row, idle = rows["src"], rows["other"]
    assert (row.slug, row.site_id, row.files, row.bytes) == ("src", site, 2, 350)
    assert row.oldest_age_seconds == pytest.approx(7200, abs=60)
    assert (row.completed_recently, row.failed_recently, row.failed) == (2, 1, 2)
    assert row.packages_by_status == {"completed": 3, "failed": 2, "pending": 1}
    assert row.metrics() == {
        "unpackaged_files": 2,
        "unpackaged_bytes": 350,
        "oldest_unpackaged_age_seconds": row.metrics()["oldest_unpackaged_age_seconds"],
        "completed_last_hour": 2,
        "failed_last_hour": 1,
        "failed": 2,
    }
    assert isinstance(row.metrics()["oldest_unpackaged_age_seconds"], float)
    assert idle.slug == "other" and idle.metrics() == {
        "unpackaged_files": 0,
        "unpackaged_bytes": 0,
        "oldest_unpackaged_age_seconds": 0.0,
        "completed_last_hour": 0,
        "failed_last_hour": 0,
        "failed": 0,
    }


def test_buffer_space_measures_each_active_buffer_and_names_one_that_does_not_answer(
    world, small_disk: Path, tmp_path: Path, monkeypatch
) -> None:
    known_hosts = tmp_path / "known_hosts"
    known_hosts.touch(mode=0o600)
    monkeypatch.setenv("CCAT_SSH_KNOWN_HOSTS", str(known_hosts))
    site, bare = world.site(), world.site("cologne")
    world.location(site, "buf", LocationType.BUFFER, root=small_disk)
    world.location(site, "old", LocationType.BUFFER, active=False)
    port = free_port("127.0.0.6")
    world.location(site, "far", LocationType.BUFFER, host="127.0.0.6", port=port, priority=2)
    hosts = HostReach(5)
    try:
        with world.session() as s:
            near, far = operations.buffer_space(s, hosts, site)
            [none] = operations.buffer_space(s, hosts, bare)
    finally:
        hosts.close()
    vfs = os.statvfs(small_disk)
    assert near == operations.BufferSpace(
        "buf", "localhost", vfs.f_bavail * vfs.f_frsize, 64 << 20, None
    )
    assert (far.location, far.host, far.free, far.total) == ("far", "127.0.0.6", None, None)
    assert far.problem is not None
    assert far.problem.startswith("HostUnreachableError: location 'far' on 127.0.0.6")
    assert (
        none.shown == "the site's buffers"
        and none.free is None
        and none.problem == ("site 'cologne' has no active BUFFER location; add or activate one")
    )


def test_a_backfill_takes_the_named_groups_or_every_waiting_and_unfinished_one(world) -> None:
    site = world.site()
    src = world.location(site, "src", LocationType.SOURCE, host="ic1")
    world.location(site, "buf", LocationType.BUFFER)
    waiting, failed, done = world.group(src), world.group(src), world.group(src)
    for group in (waiting, failed, done):
        world.file(group, f"e{group.eou_id}/a.dat")
    key = lambda g: f"src__eou{g.eou_id}__mod{g.module_id}"  # noqa: E731
    for group, status in ((failed, Status.FAILED), (done, Status.COMPLETED)):
        with world.session() as s:
            claim_packages(s, GroupKey.parse(key(group)), PackageLimits(10**9, 100), "r1")
            s.query(RawDataPackage).filter_by(executed_obs_unit_id=group.eou_id).update(
                {"status": status}
            )
    with world.session() as s:
        every = operations.backfill_groups(s, "src", [])
        named = operations.backfill_groups(s, "src", [key(done), key(done)])
    assert (every.location, every.slug, every.host) == ("src", "src", "ic1")
    assert every.keys == [key(waiting), key(failed)]  # not the completed group
    assert named.keys == [key(done)]  # named: any group with files there, once
