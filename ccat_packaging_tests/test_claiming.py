"""Claiming: one package per file, enforced by PostgreSQL while claimers truly race, and
groups split into deterministic numbered parts."""

from __future__ import annotations

import tarfile
import threading
from typing import Any

import dagster as dg
import pytest
from sqlalchemy import event, func, select

from ccat_packaging.claiming import PackageLimits, claim_packages, split_into_parts
from ccat_packaging.db import make_engine, session_scope
from ccat_packaging.discovery import GroupKey
from ccat_packaging.errors import ClaimConflictError
from ccat_packaging.models import LocationType, RawDataFile, RawDataPackage
from ccat_packaging.plans import PackagePlan
from ccat_packaging_tests.dagster_helpers import run_partition
from ccat_packaging_tests.package_checks import (
    assert_completed_and_intact,
    packages_of,
    single_site,
)


def test_concurrent_claimers_never_share_or_lose_a_file(world) -> None:
    site = world.site()
    src = world.location(site, "src", LocationType.SOURCE)
    world.location(site, "buf", LocationType.BUFFER)
    groups = [world.group(src) for _ in range(3)]
    for g in groups:
        for i in range(20):
            world.file(g, f"eou{g.eou_id}/{i}.dat", b"x", write=False)
    keys = [GroupKey("src", g.eou_id, g.module_id) for g in groups]
    barrier = threading.Barrier(8)
    plans: list[tuple[int, frozenset[str]]] = []
    errors: list[BaseException] = []
    engine = make_engine(world.url)

    def claimer(index: int) -> None:
        try:
            barrier.wait()
            for key in keys[index % 3 :] + keys[: index % 3]:
                with session_scope(engine) as s:
                    got = claim_packages(s, key, PackageLimits(10**12, 10**6), f"run-{index}")
                plans.extend((p.package_id, frozenset(m for m, _ in p.members)) for p in got)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=claimer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    engine.dispose()
    assert errors == []
    with world.session() as s:
        assert s.scalar(select(func.count()).where(RawDataFile.raw_data_package_id.is_(None))) == 0
        packages = s.scalars(select(RawDataPackage)).all()
        assert len(packages) == 3  # one per group, no empty leftovers
        for package in packages:
            assert len(package.files) == 20
    # Every claimer that got a plan saw the whole group, never a share of it.
    assert {members for _, members in plans} == {
        frozenset(f"eou{g.eou_id}/{i}.dat" for i in range(20)) for g in groups
    }


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
    _, _, buf, group, key = single_site(world)
    names = [f"d{i % 3}/f{i:02d}.dat" for i in range(10)]
    for name in names:
        world.file(group, name, size=10_000)
    with dg.instance_for_test() as instance:
        assert run_partition(instance, key).success
    packages = packages_of(world)
    assert [p.part for p in packages] == [1, 2, 3, 4, 5]
    seen: list[str] = []
    for package in packages:
        assert_completed_and_intact(world, buf, package)
        with tarfile.open(world.root(buf) / package.relative_path) as archive:
            members = archive.getmembers()
        assert sum(m.size for m in members) <= 25_000
        seen += [m.name for m in members]
    assert sorted(seen) == sorted(names) and len(seen) == len(set(seen))


# When the rival commits its claim: after this claimer listed the files as unclaimed (only
# the claim's IS NULL condition can notice), or after it also numbered its new part (the
# part's unique key notices first). The statement this claimer has just run, and its error.
RIVAL_MOMENTS = {
    "files listed": ("package_id IS NULL", "claimed some of these files"),
    "part numbered": ("max(raw_data_package.part)", "part 1 was created by another run"),
}


@pytest.mark.parametrize("moment", RIVAL_MOMENTS)
def test_a_file_claimed_between_select_and_update_is_never_taken_twice(
    any_world, moment: str
) -> None:
    """The claim's ``IS NULL`` condition is the guarantee on every backend. On PostgreSQL the
    ``FOR UPDATE`` row lock hides it (a rival waits, then sees the files claimed); here the
    lock is taken out of the statement, and SQLite has none: a rival claims and commits the
    files after this claimer has listed them as unclaimed, before it claims them. Nothing of
    the losing claim may stay behind (no empty part)."""
    world = any_world
    after, error = RIVAL_MOMENTS[moment]
    _, _, _, group, key = single_site(world)
    for i in range(5):
        world.file(group, f"{i}.dat", b"x", write=False)
    group_key, limits = GroupKey.parse(key), PackageLimits(10**9, 100)
    engine, rival = make_engine(world.url), make_engine(world.url)
    rival_plans: list[PackagePlan] = []

    @event.listens_for(engine, "before_cursor_execute", retval=True)
    def without_row_lock(*args: Any) -> tuple[str, Any]:
        statement, parameters = args[2], args[3]
        return statement.replace(" FOR UPDATE", ""), parameters

    @event.listens_for(engine, "after_cursor_execute")
    def rival_claims_after_the_listing(*args: Any) -> None:
        statement: str = args[2]
        if statement.lstrip().startswith("SELECT") and after in statement and not rival_plans:
            with session_scope(rival) as s:
                rival_plans.extend(claim_packages(s, group_key, limits, "rival-run"))

    try:
        with (
            pytest.raises(ClaimConflictError, match=error),
            session_scope(engine) as s,
        ):
            claim_packages(s, group_key, limits, "this-run")
    finally:
        engine.dispose()
        rival.dispose()
    [rival_plan] = rival_plans
    assert len(rival_plan.members) == 5, "the rival did not claim while this claimer listed"
    [package] = packages_of(world)  # the rival's; this claimer's part was rolled back
    assert (package.id, package.lease_owner) == (rival_plan.package_id, "rival-run")
    with world.session() as s:
        owners = s.scalars(select(RawDataFile.raw_data_package_id)).all()
    assert owners == [package.id] * 5
