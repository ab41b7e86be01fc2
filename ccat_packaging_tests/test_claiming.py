"""One package per file, enforced by PostgreSQL while claimers truly race."""

from __future__ import annotations

import threading

from sqlalchemy import func, select

from ccat_packaging.claiming import PackageLimits, claim_packages
from ccat_packaging.db import make_engine, session_scope
from ccat_packaging.discovery import GroupKey
from ccat_packaging.models import LocationType, RawDataFile, RawDataPackage


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
