"""Creating a package record and claiming its files, atomically.

A file is claimed by a conditional ``UPDATE ... WHERE raw_data_package_id IS NULL``: whatever
runs concurrently, the database lets exactly one package have each file. An unfinished package
of the group (from a crashed or retried run) is resumed before any new part is started, so
re-running a group converges instead of multiplying packages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import ColumnElement, CursorResult, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ccat_packaging.discovery import GroupKey, primary_buffer, source_location_for
from ccat_packaging.models import DiskDataLocation, RawDataFile, RawDataPackage, Status

UNFINISHED = (Status.PENDING, Status.SCHEDULED, Status.IN_PROGRESS)


@dataclass(frozen=True)
class Endpoint:
    """A disk location as the assembly step needs it: where, on which host, as whom."""

    location_id: int
    location_name: str
    host: str
    user: str | None
    port: int
    root: str

    @classmethod
    def of(cls, location: DiskDataLocation) -> Endpoint:
        return cls(
            location.id, location.name, location.host, location.user, location.port, location.path
        )


@dataclass(frozen=True)
class PackagePlan:
    """Everything the later steps need, so they never re-derive it from a changing database."""

    package_id: int
    name: str
    group_key: str
    part: int
    relative_path: str
    source: Endpoint
    buffer: Endpoint
    members: tuple[tuple[str, int], ...]

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.members)


def package_name(key: GroupKey, part: int) -> str:
    return f"{key}__part{part:03d}"


def package_relative_path(key: GroupKey, part: int) -> str:
    return f"{key.location_slug}/eou{key.executed_obs_unit_id}/{package_name(key, part)}.tar"


def claim_package(session: Session, key: GroupKey) -> PackagePlan | None:
    """The package to build next for this group, or None when every file is packaged.

    Raises NoActiveBufferError before claiming anything when the site has no buffer.
    """
    source = source_location_for(session, key)
    buffer = primary_buffer(session, source.site_id)
    package = _unfinished_package(session, key, source.id)
    if package is None:
        package = _new_package(session, key, source.id)
        if package is None:
            return None
    return plan_for(session, package, key, source, buffer)


def plan_for(
    session: Session,
    package: RawDataPackage,
    key: GroupKey,
    source: DiskDataLocation,
    buffer: DiskDataLocation,
) -> PackagePlan:
    rows = session.execute(
        select(RawDataFile.relative_path, RawDataFile.size).where(
            RawDataFile.raw_data_package_id == package.id
        )
    ).all()
    # Member order is by the bytes of the path, not the database collation, so the archive
    # is the same whichever database or locale produced the list.
    members = tuple(
        sorted(
            ((p, int(s)) for p, s in rows), key=lambda m: m[0].encode("utf-8", "surrogateescape")
        )
    )
    return PackagePlan(
        package_id=package.id,
        name=package.name,
        group_key=str(key),
        part=package.part,
        relative_path=package.relative_path,
        source=Endpoint.of(source),
        buffer=Endpoint.of(buffer),
        members=members,
    )


def _group_filter(key: GroupKey, location_id: int) -> tuple[ColumnElement[bool], ...]:
    return (
        RawDataPackage.source_location_id == location_id,
        RawDataPackage.executed_obs_unit_id == key.executed_obs_unit_id,
        RawDataPackage.instrument_module_id == key.instrument_module_id,
    )


def _unfinished_package(session: Session, key: GroupKey, location_id: int) -> RawDataPackage | None:
    return session.scalars(
        select(RawDataPackage)
        .where(*_group_filter(key, location_id), RawDataPackage.status.in_(UNFINISHED))
        .order_by(RawDataPackage.part)
        .limit(1)
    ).first()


def _new_package(
    session: Session, key: GroupKey, location_id: int, attempts: int = 5
) -> RawDataPackage | None:
    """Insert the group's next part and claim its unclaimed files; None if there are none."""
    for _ in range(attempts):
        last_part = session.scalar(
            select(func.max(RawDataPackage.part)).where(*_group_filter(key, location_id))
        )
        part = (last_part or 0) + 1
        package = RawDataPackage(
            name=package_name(key, part),
            relative_path=package_relative_path(key, part),
            status=Status.PENDING,
            source_location_id=location_id,
            executed_obs_unit_id=key.executed_obs_unit_id,
            instrument_module_id=key.instrument_module_id,
            part=part,
        )
        try:
            with session.begin_nested():
                session.add(package)
                session.flush()
        except IntegrityError:
            continue  # another run took this part number a moment ago; take the next
        result = session.execute(
            update(RawDataFile)
            .where(
                RawDataFile.source_location_id == location_id,
                RawDataFile.executed_obs_unit_id == key.executed_obs_unit_id,
                RawDataFile.instrument_module_id == key.instrument_module_id,
                RawDataFile.raw_data_package_id.is_(None),
            )
            .values(raw_data_package_id=package.id)
            .execution_options(synchronize_session=False)
        )
        claimed = cast(CursorResult[Any], result).rowcount
        if claimed == 0:
            session.delete(package)
            session.flush()
            return None
        return package
    raise RuntimeError(f"could not allocate a part number for {key} in {attempts} attempts")
