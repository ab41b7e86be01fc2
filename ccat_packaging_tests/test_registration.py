"""The package state machine in the database: leases, heartbeat, retries, failure and
completion, each on a real PostgreSQL database."""

from __future__ import annotations

import itertools
import time
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import update

from ccat_packaging.claiming import PackageLimits, claim_packages
from ccat_packaging.discovery import GroupKey, packages_needing_a_run
from ccat_packaging.models import RawDataPackage, RawDataPackagePhysicalCopy, Status
from ccat_packaging.plans import PackagePlan
from ccat_packaging.registration import (
    acquire_lease,
    complete,
    heartbeat,
    mark_failed,
    record_checksum,
    stale_cutoff,
)
from ccat_packaging_tests.package_checks import LONG_AGO, packages_of, single_site


def _claimed(world, owner: str) -> tuple[PackagePlan, int, int]:
    """One package of one file, leased to ``owner`` just now: (plan, source, buffer)."""
    _, src, buf, group, key = single_site(world)
    world.file(group, "a.dat")
    with world.session() as s:
        [plan] = claim_packages(s, GroupKey.parse(key), PackageLimits(10**9, 100), owner)
    return plan, src, buf


def _holder(world) -> tuple[str | None, Status]:
    [package] = packages_of(world)
    return package.lease_owner, package.status


def test_failure_never_overwrites_completion(world) -> None:
    plan, _, buf = _claimed(world, "crashed-run")
    with world.session() as s:
        record_checksum(s, plan.package_id, 10240, "0" * 64, "sha256")
        complete(s, plan.package_id, buf)
    with world.session() as s:
        assert mark_failed(s, plan.package_id, "run-2", "late failure of a slower attempt") is False
    assert packages_of(world)[0].status == Status.COMPLETED


def test_a_fresh_lease_held_by_another_run_is_left_alone(world) -> None:
    """Two runs of one group (a sensor run and a backfill) must not build one package twice:
    the other run's lease counts until its heartbeat is older than the stale cutoff."""
    plan, _, _ = _claimed(world, "run-a")
    with world.session() as s:
        assert acquire_lease(s, plan.package_id, "run-b", stale_cutoff()) is False
    assert _holder(world) == ("run-a", Status.PENDING)
    with world.session() as s:  # its holder (a retry of run-a) takes it up again
        assert acquire_lease(s, plan.package_id, "run-a", stale_cutoff()) is True
    assert _holder(world) == ("run-a", Status.IN_PROGRESS)
    with world.session() as s:
        assert acquire_lease(s, plan.package_id, "run-b", stale_cutoff()) is False
    with world.session() as s:  # run-a died: its heartbeat stopped long ago
        s.execute(update(RawDataPackage).values(updated_at=LONG_AGO))
    with world.session() as s:
        assert acquire_lease(s, plan.package_id, "run-b", stale_cutoff()) is True
    assert _holder(world) == ("run-b", Status.IN_PROGRESS)


def test_a_free_package_is_taken_and_a_completed_one_never(world) -> None:
    plan, _, buf = _claimed(world, "run-a")
    with world.session() as s:  # released, as an operator's requeue leaves it
        s.execute(update(RawDataPackage).values(lease_owner=None))
    with world.session() as s:
        assert acquire_lease(s, plan.package_id, "run-b", stale_cutoff()) is True
        record_checksum(s, plan.package_id, 10240, "0" * 64, "sha256")
        complete(s, plan.package_id, buf)
    with world.session() as s:
        s.execute(update(RawDataPackage).values(updated_at=LONG_AGO))
    for owner in ("run-b", "run-c"):
        with world.session() as s:
            assert acquire_lease(s, plan.package_id, owner, stale_cutoff()) is False
    assert _holder(world) == (None, Status.COMPLETED)


def _heartbeat_at(world) -> datetime:
    [package] = packages_of(world)
    return package.updated_at.replace(tzinfo=package.updated_at.tzinfo or UTC)


def test_the_heartbeat_keeps_a_lease_fresh_while_work_goes_on_and_stops_with_it(world) -> None:
    plan, src, _ = _claimed(world, "run-a")
    with world.session() as s:
        s.execute(update(RawDataPackage).values(updated_at=LONG_AGO))
    seen = [LONG_AGO]  # the heartbeat found, then every new one
    stale_after = timedelta(seconds=1)
    work = itertools.count().__next__  # bytes moved: more at every look
    with heartbeat(world.engine, plan.package_id, interval=0.1, progress=work):
        deadline = time.monotonic() + 2.5
        while time.monotonic() < deadline:  # the work: 2.5 s, longer than the stale limit
            time.sleep(0.05)
            if (now := _heartbeat_at(world)) != seen[-1]:
                seen.append(now)
        cutoff = datetime.now(UTC) - stale_after
        with world.session() as s:
            assert acquire_lease(s, plan.package_id, "run-b", cutoff) is False
            assert packages_needing_a_run(s, src, cutoff) == []
    beats = len(seen) - 1
    assert beats >= 5, f"updated_at moved {beats} times in 2.5 s, beating every 0.1 s: {seen}"
    assert seen == sorted(seen)
    stopped = _heartbeat_at(world)
    time.sleep(1.1)  # the work ended, or its process died: no beat any more
    assert _heartbeat_at(world) == stopped
    cutoff = datetime.now(UTC) - stale_after
    with world.session() as s:  # so a stalled heartbeat is noticed, and the package resumed
        assert [p.package_id for p in packages_needing_a_run(s, src, cutoff)] == [plan.package_id]
        assert acquire_lease(s, plan.package_id, "run-b", cutoff) is True


@pytest.mark.parametrize("recorded", ["nothing", "size only", "checksum only"])
def test_a_package_is_never_completed_without_its_size_and_checksum(world, recorded: str) -> None:
    """The checksum step records both before the package may count as at the buffer; a
    completion without them would be a package nobody can verify."""
    plan, _, buf = _claimed(world, "run-a")
    with world.session() as s:
        if recorded != "nothing":
            s.execute(
                update(RawDataPackage).values(
                    size=10240 if recorded == "size only" else None,
                    checksum="0" * 64 if recorded == "checksum only" else None,
                )
            )
    with world.session() as s, pytest.raises(ValueError, match="no recorded size and checksum"):
        complete(s, plan.package_id, buf)
    assert _holder(world) == ("run-a", Status.PENDING)
    with world.session() as s:
        assert s.query(RawDataPackagePhysicalCopy).count() == 0
