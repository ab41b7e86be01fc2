"""Discovery rules as plain Python: group keys, source locations, the sensor's cursor."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import update

from ccat_packaging.claiming import PackageLimits, claim_packages
from ccat_packaging.discovery import (
    GroupKey,
    SensorCursor,
    discover_groups,
    location_slug,
    parse_discovery_cursor,
    plan_tick,
    sensor_name_clashes,
    serialize_discovery_cursor,
    source_location_for,
    source_locations,
    unfinished_groups,
)
from ccat_packaging.errors import ConfigurationError
from ccat_packaging.models import LocationType, RawDataFile, RawDataPackage, Status

SOURCE, BUFFER = LocationType.SOURCE, LocationType.BUFFER


def test_group_key_round_trip_and_rejects_garbage() -> None:
    key = GroupKey("primecam_raw", 42, 7)
    assert str(key) == "primecam_raw__eou42__mod7"
    assert GroupKey.parse(str(key)) == key
    for bad in ["", "x", "a__eou1", "a b__eou1__mod2", "a__eou1__mod2; rm -rf /", "a__eoux__mod1"]:
        with pytest.raises(ConfigurationError):
            GroupKey.parse(bad)


def test_location_slug_is_a_valid_dagster_name() -> None:
    assert location_slug("primecam-raw data.1") == "primecam_raw_data_1"
    with pytest.raises(ConfigurationError):
        location_slug("---")


def test_locations_under_one_sensor_name_are_found_as_a_clash(world) -> None:
    site = world.site()
    world.location(site, "prime-cam", SOURCE)
    world.location(site, "inactive", SOURCE, active=False)
    world.location(site, "buf", BUFFER)
    with world.session() as s:
        assert [r.name for r in source_locations(s)] == ["prime-cam"]
    world.location(site, "prime_cam", SOURCE)
    world.location(site, "chai", SOURCE)
    with world.session() as s:
        found = source_locations(s)
    assert [r.name for r in found] == ["prime-cam", "prime_cam", "chai"]
    assert sensor_name_clashes(found) == {"prime_cam": ["prime-cam", "prime_cam"]}


def test_the_location_of_a_group_is_the_active_one_and_never_a_guess(world) -> None:
    site = world.site()
    old = world.location(site, "prime cam", SOURCE, active=False)
    key = GroupKey("prime_cam", 1, 1)
    with world.session() as s:
        assert source_location_for(s, key).id == old  # old groups stay packable
    new = world.location(site, "prime-cam", SOURCE)
    with world.session() as s:
        assert source_location_for(s, key).id == new  # the active one, whatever the ids
    world.location(site, "prime_cam", SOURCE)
    with world.session() as s, pytest.raises(ConfigurationError, match="could mean SOURCE"):
        source_location_for(s, key)


def _file_at(world, group, path: str, filed_at: datetime) -> None:
    file_id = world.file(group, path, b"x")
    with world.session() as s:
        s.execute(update(RawDataFile).where(RawDataFile.id == file_id).values(created_at=filed_at))


def test_tick_pages_through_groups_without_repeats_or_gaps_even_on_ties(world) -> None:
    site = world.site()
    src = world.location(site, "src", SOURCE)
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    groups = [world.group(src) for _ in range(5)]
    # Three groups share one filing time: a page boundary falls inside the tie.
    times = [
        t0,
        t0 + timedelta(seconds=1),
        t0 + timedelta(seconds=1),
        t0 + timedelta(seconds=1),
        t0 + timedelta(seconds=2),
    ]
    for g, t in zip(groups, times, strict=True):
        _file_at(world, g, f"e{g.eou_id}/a.dat", t)
    cursor, now, seen = SensorCursor(), 1000.0, []
    with world.session() as s:
        for _ in range(5):
            tick = plan_tick(s, src, cursor, now=now, limit=2, rescan_seconds=600)
            seen += [g.key.executed_obs_unit_id for g in tick.groups]
            cursor = SensorCursor.parse(tick.cursor.serialize())
            now += 1
    assert sorted(seen) == sorted(g.eou_id for g in groups)
    assert len(seen) == len(set(seen))
    # A late file in an old group moves that group past the cursor: requested again.
    _file_at(world, groups[0], f"e{groups[0].eou_id}/late.dat", t0 + timedelta(seconds=3))
    with world.session() as s:
        tick = plan_tick(s, src, cursor, now=now, limit=2, rescan_seconds=600)
    assert [g.key.executed_obs_unit_id for g in tick.groups] == [groups[0].eou_id]
    assert tick.groups[0].file_count == 2


def test_rescan_starts_over_to_catch_late_commits(world) -> None:
    site = world.site()
    src = world.location(site, "src", SOURCE)
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    g_new, g_old = world.group(src), world.group(src)
    _file_at(world, g_new, "new.dat", t0 + timedelta(hours=1))
    with world.session() as s:
        first = plan_tick(s, src, SensorCursor(), now=0.0, limit=10, rescan_seconds=600)
    # A file filed earlier than the cursor but committed only now is invisible until the rescan.
    _file_at(world, g_old, "old.dat", t0)
    with world.session() as s:
        quiet = plan_tick(s, src, first.cursor, now=10.0, limit=10, rescan_seconds=600)
        rescan = plan_tick(s, src, first.cursor, now=601.0, limit=10, rescan_seconds=600)
    assert quiet.groups == [] and not quiet.rescanned
    assert rescan.rescanned
    assert {g.key.executed_obs_unit_id for g in rescan.groups} == {g_old.eou_id, g_new.eou_id}


def test_discovery_finds_new_groups_from_its_cursor_and_unfinished_ones_on_a_rescan(
    world,
) -> None:
    """What ``file_group_discovery`` registers: every group with unpackaged files, once, and
    the groups of packages not completed (failed ones too: a backfill re-drives them)."""
    site = world.site()
    src = world.location(site, "src", SOURCE)
    other = world.location(site, "other", SOURCE)
    world.location(site, "buf", BUFFER)
    waiting, failed, done = world.group(src), world.group(src), world.group(src)
    world.file(world.group(other), "elsewhere.dat")  # another location's partition set
    for group in (waiting, failed, done):
        world.file(group, f"e{group.eou_id}/a.dat")
    with world.session() as s:
        limits = PackageLimits(10**9, 100)
        claim_packages(s, GroupKey("src", failed.eou_id, failed.module_id), limits, "run-1")
        claim_packages(s, GroupKey("src", done.eou_id, done.module_id), limits, "run-2")
        s.execute(
            update(RawDataPackage)
            .where(RawDataPackage.executed_obs_unit_id == failed.eou_id)
            .values(status=Status.FAILED)
        )
        s.execute(
            update(RawDataPackage)
            .where(RawDataPackage.executed_obs_unit_id == done.eou_id)
            .values(status=Status.COMPLETED)
        )
    key = lambda g: f"src__eou{g.eou_id}__mod{g.module_id}"  # noqa: E731
    with world.session() as s:
        assert [str(k) for k in unfinished_groups(s, src)] == [key(failed)]
        first = discover_groups(s, src, SensorCursor(), now=0.0, page=10, rescan_seconds=600)
    assert first.rescanned and first.keys == [key(waiting), key(failed)]
    cursors = parse_discovery_cursor(serialize_discovery_cursor({"src": first.cursor}))
    with world.session() as s:
        quiet = discover_groups(s, src, cursors["src"], now=10.0, page=10, rescan_seconds=600)
    assert quiet.keys == [] and not quiet.rescanned  # nothing filed: nothing read again
    newcomer = world.group(src)
    world.file(newcomer, "new.dat")
    with world.session() as s:
        later = discover_groups(s, src, quiet.cursor, now=20.0, page=10, rescan_seconds=600)
    assert later.keys == [key(newcomer)]
