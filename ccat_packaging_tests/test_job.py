"""The packaging job end to end through Dagster, on PostgreSQL and on the SQLite default."""

from __future__ import annotations

import hashlib
import stat
import tarfile
from collections.abc import Callable
from pathlib import Path

import dagster as dg
import pytest
from sqlalchemy import select, update

from ccat_packaging.claiming import PackageLimits, claim_packages
from ccat_packaging.definitions import defs
from ccat_packaging.discovery import GroupKey
from ccat_packaging.jobs import BuiltPackage
from ccat_packaging.models import (
    LocationType,
    PhysicalCopyStatus,
    RawDataFile,
    RawDataPackage,
    RawDataPackagePhysicalCopy,
    Status,
)
from ccat_packaging.names import (
    RUN_KEY_TAG,
    SENSOR_NAME_TAG,
    job_name,
    packages_asset,
    partitions_name,
)
from ccat_packaging_tests.dagster_helpers import node, op_of, run_partition

FILES = [
    "scan_00/frame_000.fits",
    "scan_00/frame_001.fits",
    "scan_01/nested/deeper/frame_002.fits",
    "housekeeping.log",
    "with space & ünïcode/frame (3).fits",
]


def _packages(world) -> list[RawDataPackage]:
    with world.session() as s:
        return list(s.scalars(select(RawDataPackage).order_by(RawDataPackage.part)))


def _setup(world):
    site = world.site()
    src = world.location(site, "src", LocationType.SOURCE)
    buf = world.location(site, "buf", LocationType.BUFFER)
    world.location(site, "spare", LocationType.BUFFER, priority=5)
    group = world.group(src)
    contents = {name: world.file_bytes(group, name) for name in FILES}
    return group, buf, contents


def test_job_builds_a_tar_of_exactly_the_group_with_an_independent_sha256(any_world) -> None:
    world = any_world
    group, buf, contents = _setup(world)
    key = f"src__eou{group.eou_id}__mod{group.module_id}"
    with dg.instance_for_test() as instance:
        result = run_partition(instance, key)
        assert result.success
        materializations = instance.fetch_materializations(packages_asset("src"), limit=10).records
    [package] = _packages(world)
    tar_path = world.root(buf) / package.relative_path
    assert package.status == Status.COMPLETED
    assert package.size == tar_path.stat().st_size
    assert package.checksum_algorithm == "sha256"
    assert package.checksum == hashlib.sha256(tar_path.read_bytes()).hexdigest()
    with tarfile.open(tar_path) as archive:
        members = {m.name: archive.extractfile(m).read() for m in archive}  # type: ignore[union-attr]
    assert members == contents
    with world.session() as s:
        copies = s.scalars(select(RawDataPackagePhysicalCopy)).all()
        assert [(c.data_location_id, c.status) for c in copies] == [
            (buf, PhysicalCopyStatus.PRESENT)
        ]
        assert {f.raw_data_package_id for f in s.scalars(select(RawDataFile))} == {package.id}
    # No temporary file is left next to the published archive.
    assert sorted(p.name for p in tar_path.parent.iterdir()) == [
        f".{tar_path.name}.lock",
        tar_path.name,
    ]
    assert [m.partition_key for m in materializations] == [key]
    built = result.output_for_node(node("src", "checksum"))[f"part{package.part:03d}"]
    assert built.archive.checksum == package.checksum


def test_a_failed_group_is_a_failed_partition_until_a_later_run_packages_it(world) -> None:
    """What the asset's partitions tab shows (red, then materialized) is the instance's
    status of the group's partition, read here as the UI reads it."""
    group, _, _ = _setup(world)
    key = f"src__eou{group.eou_id}__mod{group.module_id}"
    source_file = world.root(group.location_id) / FILES[0]
    away = source_file.with_name("moved away")
    source_file.rename(away)  # a permanent failure of the group's package
    asset = packages_asset("src")
    partitions = defs().resolve_job_def(job_name("src")).partitions_def
    assert partitions is not None
    with dg.instance_for_test() as instance:
        assert not run_partition(instance, key).success
        failed = instance.get_status_by_partition(asset, [key], partitions)
        assert failed == {key: dg.AssetPartitionStatus.FAILED}
        away.rename(source_file)
        assert run_partition(instance, key).success  # an operator's run re-drives it
        fixed = instance.get_status_by_partition(asset, [key], partitions)
        assert fixed == {key: dg.AssetPartitionStatus.MATERIALIZED}
    [package] = _packages(world)
    assert package.status == Status.COMPLETED


def test_a_sensor_run_that_leaves_a_failed_part_alone_keeps_the_partition_failed(world) -> None:
    """Late files get a part of their own in a sensor run, which does not re-drive the failed
    one: the new part is built, yet the group is not green while a package of it is failed."""
    group, _, _ = _setup(world)
    key = f"src__eou{group.eou_id}__mod{group.module_id}"
    source_file = world.root(group.location_id) / FILES[0]
    source_file.rename(source_file.with_name("moved away"))
    asset = packages_asset("src")
    partitions = defs().resolve_job_def(job_name("src")).partitions_def
    assert partitions is not None
    sensor_run = {SENSOR_NAME_TAG: "package_src_sensor", RUN_KEY_TAG: "late"}
    with dg.instance_for_test() as instance:
        assert not run_partition(instance, key, sensor_run).success
        world.file_bytes(group, "late/scan_99.fits", size=1000)
        late = run_partition(instance, key, {**sensor_run, RUN_KEY_TAG: "later"})
        assert not late.success
        [failure] = [
            e
            for e in late.all_events
            if e.is_step_failure and op_of(e.step_key) == "summarise_group"
        ]
        assert failure.step_failure_data is not None
        reason = failure.step_failure_data.user_failure_data
        assert reason is not None and reason.description is not None
        assert reason.description.startswith(f"1 package(s) of {key} failed: {key}__part001: ")
        status = instance.get_status_by_partition(asset, [key], partitions)
        assert status == {key: dg.AssetPartitionStatus.FAILED}
    assert {p.name: p.status for p in _packages(world)} == {
        f"{key}__part001": Status.FAILED,
        f"{key}__part002": Status.COMPLETED,
    }


def test_ccat_archive_mode_is_the_published_archive_s_mode(
    world, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The setting is read by the worker and carried to the buffer's agent in the publish
    spec; the default (the umask) is the agent's own test."""
    group, buf, _ = _setup(world)
    monkeypatch.setenv("CCAT_ARCHIVE_MODE", "0440")
    with dg.instance_for_test() as instance:
        assert run_partition(instance, f"src__eou{group.eou_id}__mod{group.module_id}").success
    [package] = _packages(world)
    assert stat.S_IMODE((world.root(buf) / package.relative_path).stat().st_mode) == 0o440


def test_rerunning_a_packaged_group_changes_nothing(world) -> None:
    group, _, _ = _setup(world)
    key = f"src__eou{group.eou_id}__mod{group.module_id}"
    with dg.instance_for_test() as instance:
        assert run_partition(instance, key).success
        before = [(p.id, p.checksum, p.updated_at) for p in _packages(world)]
        again = run_partition(instance, key)
        assert again.success
        # Nothing to build, and the group's partition is materialized again all the same.
        [latest, _] = instance.fetch_materializations(packages_asset("src"), limit=10).records
        assert latest.run_id == again.run_id
        summary = latest.asset_materialization
        assert summary is not None and summary.partition == key
        assert summary.metadata["built_by_this_run"].value == 0
        assert summary.metadata["packages"].value == 1
        started = [
            op_of(e.step_key)
            for e in again.all_events
            if e.event_type == dg.DagsterEventType.STEP_START
        ]
    assert [(p.id, p.checksum, p.updated_at) for p in _packages(world)] == before
    assert started == ["create_package_records", "summarise_group"]  # no package is built


def test_late_files_go_into_a_new_part_and_the_first_is_untouched(world) -> None:
    group, buf, _ = _setup(world)
    key = f"src__eou{group.eou_id}__mod{group.module_id}"
    with dg.instance_for_test() as instance:
        assert run_partition(instance, key).success
        first = _packages(world)[0]
        first_bytes = (world.root(buf) / first.relative_path).read_bytes()
        world.file(group, "late/frame_999.fits")
        assert run_partition(instance, key).success
    part1, part2 = _packages(world)
    assert (part1.checksum, part1.part, part2.part) == (first.checksum, 1, 2)
    assert (world.root(buf) / part1.relative_path).read_bytes() == first_bytes
    with tarfile.open(world.root(buf) / part2.relative_path) as archive:
        assert archive.getnames() == ["late/frame_999.fits"]


def test_no_active_buffer_fails_the_run_with_the_reason_and_claims_nothing(world) -> None:
    site = world.site()
    src = world.location(site, "src", LocationType.SOURCE)
    group = world.group(src)
    world.file(group, "a.dat")
    with dg.instance_for_test() as instance:
        result = run_partition(instance, f"src__eou{group.eou_id}__mod{group.module_id}")
    assert not result.success
    failure = result.get_step_failure_events()[0]
    assert "NoActiveBufferError" in str(failure.step_failure_data.error)
    assert _packages(world) == []
    with world.session() as s:
        assert [f.raw_data_package_id for f in s.scalars(select(RawDataFile))] == [None]


def test_a_missing_source_file_fails_without_publishing(world, tmp_path: Path) -> None:
    group, buf, _ = _setup(world)
    (world.root(group.location_id) / FILES[1]).unlink()
    with dg.instance_for_test() as instance:
        result = run_partition(instance, f"src__eou{group.eou_id}__mod{group.module_id}")
    assert not result.success
    message = str(result.get_step_failure_events()[0].step_failure_data.error)
    assert "SourceFileError" in message and FILES[1] in message
    assert [p for p in world.root(buf).rglob("*") if p.is_file() and ".lock" not in p.name] == []


def _truncate(path: Path) -> None:
    """The last record is lost, as after a crash of the disk's cache."""
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size - 10240)


def _flip_header_byte(member: int) -> Callable[[Path], None]:
    """A bit flipped in the name of a member's header (the first member's or a later one's)."""

    def damage(path: Path) -> None:
        with tarfile.open(path) as archive:
            offsets = [m.offset for m in archive]
        with open(path, "r+b") as handle:
            handle.seek(offsets[member])
            first = handle.read(1)
            handle.seek(offsets[member])
            handle.write(bytes([first[0] ^ 0x01]))

    return damage


@pytest.mark.parametrize(
    "damage",
    [_truncate, _flip_header_byte(0), _flip_header_byte(2)],
    ids=["truncated", "first header corrupted", "later header corrupted"],
)
def test_an_archive_damaged_between_assembly_and_checksum_is_never_published(
    world, damage: Callable[[Path], None]
) -> None:
    """The checksum step's verify is all that stands between a damaged temporary archive and
    the buffer: the damage happens in a real run, right after assemble_tar succeeded."""
    group, buf, _ = _setup(world)
    key = f"src__eou{group.eou_id}__mod{group.module_id}"
    damaged: list[Path] = []

    @dg.success_hook
    def damage_the_temporary_archive(context: dg.HookContext) -> None:
        if context.op.name == "assemble_tar":
            built = context.op_output_values["result"]  # a mapped step's one output
            assert isinstance(built, BuiltPackage) and built.archive is not None
            damaged.append(Path(built.archive.temp_path))
            damage(damaged[-1])

    job = defs().resolve_job_def(job_name("src")).with_hooks({damage_the_temporary_archive})
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(partitions_name("src"), [key])
        result = job.execute_in_process(instance=instance, partition_key=key, raise_on_error=False)
    assert len(damaged) == 1, "the hook never ran: nothing was damaged"
    assert not result.success
    [failure] = result.get_step_failure_events()
    assert op_of(failure.step_key) == "checksum"
    [package] = _packages(world)
    assert package.status == Status.FAILED and package.retry_count == 0
    assert (package.failure_reason or "").startswith("ArchiveVerificationError")
    assert (package.size, package.checksum) == (None, None)
    assert not (world.root(buf) / package.relative_path).exists()
    assert not damaged[0].exists()  # discarded, not left to the next attempt
    with world.session() as s:
        assert s.scalars(select(RawDataPackagePhysicalCopy)).all() == []


def test_a_package_another_live_run_is_building_is_left_to_it(world) -> None:
    """A backfill of a group whose package a sensor run is building right now must not
    build it a second time beside it: the other run's lease is fresh."""
    group, buf, _ = _setup(world)
    key = f"src__eou{group.eou_id}__mod{group.module_id}"
    with world.session() as s:
        claim_packages(s, GroupKey.parse(key), PackageLimits(10**9, 100), "live-sensor-run")
        s.execute(update(RawDataPackage).values(status=Status.IN_PROGRESS))
    with dg.instance_for_test() as instance:
        result = run_partition(instance, key)
    assert result.success
    [package] = _packages(world)
    assert (package.status, package.lease_owner) == (Status.IN_PROGRESS, "live-sensor-run")
    assert (package.size, package.checksum) == (None, None)
    assert [p for p in world.root(buf).rglob("*") if ".lock" not in p.name and p.is_file()] == []
    built = result.output_for_node(node("src", "assemble_tar"))[f"part{package.part:03d}"]
    assert built.archive is None
