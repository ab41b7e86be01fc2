"""Retention: partitions of groups completed long ago are retired, old finished runs deleted,
and nothing in the operations database changes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import dagster as dg
from dagster._core.storage.runs.schema import RunsTable  # only way to back-date a run
from sqlalchemy import select, update

from ccat_packaging.definitions import defs
from ccat_packaging.discovery import GroupKey
from ccat_packaging.models import LocationType, RawDataPackage
from ccat_packaging.names import partitions_name
from ccat_packaging.retention import retirable_groups
from ccat_packaging_tests.dagster_helpers import run_partition

LONG_AGO = datetime.now(UTC) - timedelta(days=40)
SENSOR_RUN = {"dagster/sensor_name": "package_src_sensor"}


def _age(world, key: str, when: datetime) -> None:
    """As if the group's packages had completed at ``when``."""
    parsed = GroupKey.parse(key)
    with world.session() as s:
        s.execute(
            update(RawDataPackage)
            .where(
                RawDataPackage.executed_obs_unit_id == parsed.executed_obs_unit_id,
                RawDataPackage.instrument_module_id == parsed.instrument_module_id,
            )
            .values(updated_at=when)
        )


def _groups_in_every_state(world, instance: dg.DagsterInstance, monkeypatch) -> dict[str, str]:
    """One group per state, packaged by the real job; name -> partition key."""
    monkeypatch.setenv("CCAT_PACKAGE_MAX_FILES", "1")  # two files make two parts
    site = world.site()
    src = world.location(site, "src", LocationType.SOURCE)
    world.location(site, "buf", LocationType.BUFFER)
    keys: dict[str, str] = {}
    for name in ("old", "old_two_parts", "recent", "old_with_late_file", "old_failed"):
        group = world.group(src)
        keys[name] = key = f"src__eou{group.eou_id}__mod{group.module_id}"
        world.file(group, f"{name}/a.dat")
        if name in ("old_two_parts", "old_failed"):
            world.file(group, f"{name}/b.dat")
        if name == "old_failed":  # one part fails, the other completes
            (world.root(src) / f"{name}/a.dat").unlink()
        run_partition(instance, key, tags=SENSOR_RUN)
        if name == "old_with_late_file":
            world.file(group, f"{name}/late.dat")
        if name != "recent":
            _age(world, key, LONG_AGO)
    return keys


def test_only_groups_completed_long_ago_with_nothing_left_are_retirable(world, monkeypatch) -> None:
    with dg.instance_for_test() as instance:
        keys = _groups_in_every_state(world, instance, monkeypatch)
    now = datetime.now(UTC)
    with world.session() as s:
        retirable = [str(k) for k in retirable_groups(s, now - timedelta(days=30))]
        assert retirable == [keys["old"], keys["old_two_parts"]]
        assert [str(k) for k in retirable_groups(s, now + timedelta(minutes=1))] == [
            keys["old"],
            keys["old_two_parts"],
            keys["recent"],
        ]


def test_the_retention_job_retires_partitions_and_deletes_old_runs_only(world, monkeypatch) -> None:
    monkeypatch.setenv("CCAT_RUN_RETENTION_DAYS", "30")
    with dg.instance_for_test() as instance:
        keys = _groups_in_every_state(world, instance, monkeypatch)
        with world.session() as s:
            before = [(p.id, p.status, p.checksum) for p in s.scalars(select(RawDataPackage))]
        runs = instance.get_run_records()
        old_run = runs[-1].dagster_run.run_id  # the "old" group's run
        with instance.run_storage.connect() as conn:  # type: ignore[attr-defined]
            conn.execute(
                RunsTable.update()
                .where(RunsTable.c.run_id == old_run)
                .values(update_timestamp=LONG_AGO.replace(tzinfo=None))
            )
        job = defs().resolve_job_def("packaging_retention")
        result = job.execute_in_process(instance=instance)
        assert result.success
        assert result.output_for_node("retire_file_group_partitions") == 2
        assert result.output_for_node("delete_old_runs") == 1
        assert sorted(instance.get_dynamic_partitions(partitions_name("src"))) == sorted(
            [keys["recent"], keys["old_with_late_file"], keys["old_failed"]]
        )
        remaining = {r.dagster_run.run_id for r in instance.get_run_records()}
        assert old_run not in remaining and len(remaining) == len(runs)  # + the retention run
    with world.session() as s:
        assert [(p.id, p.status, p.checksum) for p in s.scalars(select(RawDataPackage))] == before
