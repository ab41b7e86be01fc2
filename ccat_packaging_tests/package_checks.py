"""Checks on packages and buffers shared by the tests of claiming, failures and buffers."""

from __future__ import annotations

import hashlib
import os
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
from sqlalchemy import select

from ccat_packaging.models import LocationType, RawDataPackage, Status

MB = 1 << 20
LONG_AGO = datetime(2000, 1, 1, tzinfo=UTC)  # a heartbeat that stopped long ago


def packages_of(world) -> list[RawDataPackage]:
    """Every package, in part order."""
    with world.session() as s:
        return list(s.scalars(select(RawDataPackage).order_by(RawDataPackage.part)))


def leftovers(root: Path) -> list[str]:
    """Files in a buffer other than published archives and their lock files."""
    return sorted(
        p.name for p in root.rglob("*") if p.is_file() and not p.name.endswith((".tar", ".lock"))
    )


def single_site(world, buffer_root: Path | None = None):
    """One site with SOURCE ``src``, BUFFER ``buf`` and one group: (site, src, buf, group, key)."""
    site = world.site()
    src = world.location(site, "src", LocationType.SOURCE)
    buf = world.location(site, "buf", LocationType.BUFFER, root=buffer_root)
    group = world.group(src)
    key = f"src__eou{group.eou_id}__mod{group.module_id}"
    return site, src, buf, group, key


def big_file(world, group, name: str, size: int) -> None:
    """Incompressible-looking but cheap to make: one random block repeated, not sparse."""
    block = os.urandom(4 * MB)
    path = world.root(group.location_id) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        for _ in range(size // len(block)):
            handle.write(block)
    world.file(group, name, write=False, size=size)


def assert_completed_and_intact(world, buf: int, package: RawDataPackage) -> None:
    tar = world.root(buf) / package.relative_path
    assert package.status == Status.COMPLETED
    assert package.size == tar.stat().st_size
    digest = hashlib.sha256()
    with open(tar, "rb") as handle:
        while chunk := handle.read(8 * MB):
            digest.update(chunk)
    assert package.checksum == digest.hexdigest()


def step_retries(result: dg.ExecuteInProcessResult) -> int:
    """How often the run's steps were retried."""
    return sum(
        1 for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_UP_FOR_RETRY
    )
