"""Who re-drives a failed package: an operator's run does, a sensor's run never does."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import dagster as dg
from sqlalchemy import update

from ccat_packaging.models import LocationType, RawDataPackage, Status
from ccat_packaging.registration import acquire_lease
from ccat_packaging_tests.dagster_helpers import op_of, run_partition

SENSOR_RUN = {"dagster/sensor_name": "package_src_sensor", "dagster/run_key": "k"}


def _failed_package(world):
    site = world.site()
    src = world.location(site, "src", LocationType.SOURCE)
    world.location(site, "buf", LocationType.BUFFER)
    group = world.group(src)
    content = world.file_bytes(group, "a.dat")
    path = world.root(src) / "a.dat"
    path.unlink()
    key = f"src__eou{group.eou_id}__mod{group.module_id}"
    return group, key, path, content


def _package(world) -> RawDataPackage:
    with world.session() as s:
        return s.query(RawDataPackage).one()


def test_a_backfill_redrives_failed_packages_and_a_sensor_run_does_not(world) -> None:
    group, key, path, content = _failed_package(world)
    with dg.instance_for_test() as instance:
        assert not run_partition(instance, key, tags=SENSOR_RUN).success
        with world.session() as s:
            s.execute(update(RawDataPackage).values(retry_count=2))
        failed = _package(world)
        assert failed.status == Status.FAILED
        path.write_bytes(content)  # the cause is fixed
        world.file(group, "late.dat")
        # A sensor run for the late file builds a new part and leaves the failed one alone;
        # only its last step fails, saying the group still holds a failed package (so the
        # group's partition stays failed until an operator re-drives it).
        late = run_partition(instance, key, tags=SENSOR_RUN)
        failed_steps = [op_of(e.step_key) for e in late.all_events if e.is_step_failure]
        assert failed_steps == ["summarise_group"]
        with world.session() as s:
            by_part = {p.part: p for p in s.query(RawDataPackage)}
        assert (by_part[1].status, by_part[2].status) == (Status.FAILED, Status.COMPLETED)
        # A backfill of the partition re-drives it, retry count and reason reset.
        result = run_partition(instance, key, tags={"dagster/backfill": "abc"})
        assert result.success
    with world.session() as s:
        redriven = s.get_one(RawDataPackage, failed.id)
        assert (redriven.status, redriven.retry_count, redriven.failure_reason) == (
            Status.COMPLETED,
            0,
            None,
        )


def test_taking_a_failed_package_again_starts_a_fresh_retry_budget(world) -> None:
    _, key, _, _ = _failed_package(world)
    with dg.instance_for_test() as instance:
        assert not run_partition(instance, key, tags=SENSOR_RUN).success
    package = _package(world)
    with world.session() as s:
        s.execute(update(RawDataPackage).values(retry_count=3))
        assert acquire_lease(s, package.id, "re-execution", datetime.now(UTC) - timedelta(1))
    again = _package(world)
    assert (again.status, again.retry_count, again.failure_reason) == (
        Status.IN_PROGRESS,
        0,
        None,
    )
