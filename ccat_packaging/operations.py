"""What operators ask of the packaging stage, as plain functions over the database.

The ``ccat-packaging`` command prints these. They never touch source files; ``verify`` reads
a published package where it lies, on its buffer's host.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ccat_packaging.assembly import tar_agent
from ccat_packaging.assembly.hosts import Hosts
from ccat_packaging.buffer_choice import primary_buffer
from ccat_packaging.discovery import source_locations, unpackaged_groups
from ccat_packaging.errors import ConfigurationError
from ccat_packaging.models import (
    DataLocation,
    DiskDataLocation,
    PhysicalCopyStatus,
    RawDataFile,
    RawDataPackage,
    RawDataPackagePhysicalCopy,
    Status,
)
from ccat_packaging.plans import Endpoint
from ccat_packaging.registration import reset_failed


@dataclass(frozen=True)
class LocationBacklog:
    location: str
    files: int
    bytes: int
    oldest_filed_at: datetime | None
    packages_by_status: dict[str, int]


def backlog(session: Session) -> list[LocationBacklog]:
    """Unpackaged files and bytes, the oldest one's filing time, packages by status."""
    result = []
    for ref in source_locations(session):
        files, total, oldest = session.execute(
            select(
                func.count(),
                func.coalesce(func.sum(RawDataFile.size), 0),
                func.min(RawDataFile.created_at),
            ).where(
                RawDataFile.source_location_id == ref.id,
                RawDataFile.raw_data_package_id.is_(None),
            )
        ).one()
        by_status = dict(
            session.execute(
                select(RawDataPackage.status, func.count())
                .where(RawDataPackage.source_location_id == ref.id)
                .group_by(RawDataPackage.status)
            ).all()
        )
        result.append(
            LocationBacklog(
                ref.name,
                int(files),
                int(total),
                oldest.replace(tzinfo=oldest.tzinfo or UTC) if oldest else None,
                {str(status.value): int(n) for status, n in by_status.items()},
            )
        )
    return result


@dataclass(frozen=True)
class DryRunLocation:
    location: str
    buffer: str | None
    problem: str | None
    groups: list[tuple[str, int, int]]


def dry_run(session: Session, limit: int = 1000) -> list[DryRunLocation]:
    """What each location's sensor would request from scratch, without changing anything."""
    result = []
    for ref in source_locations(session):
        location = session.get_one(DataLocation, ref.id)
        try:
            buffer: str | None = primary_buffer(session, location.site_id).name
            problem = None
        except ConfigurationError as exc:
            buffer, problem = None, str(exc)
        groups = unpackaged_groups(session, ref.id, None, limit)
        result.append(
            DryRunLocation(
                ref.name,
                buffer,
                problem,
                [(str(g.key), g.file_count, g.total_bytes) for g in groups],
            )
        )
    return result


def requeue_failed(
    session: Session, package: str | None = None, location: str | None = None
) -> list[str]:
    """Failed packages back to ``pending`` with a fresh retry budget; the location's sensor
    starts a run for each on its next tick. Returns the names requeued."""
    conditions = []
    if package is not None:
        conditions.append(RawDataPackage.name == package)
    if location is not None:
        loc = session.scalars(
            select(DiskDataLocation).where(DiskDataLocation.name == location)
        ).one_or_none()
        if loc is None:
            raise ConfigurationError(f"no location named {location!r}")
        conditions.append(RawDataPackage.source_location_id == loc.id)
    names = reset_failed(session, *conditions, owner=None)
    if package is not None and not names:
        raise ConfigurationError(f"no failed package named {package!r}")
    return names


@dataclass(frozen=True)
class RecordedCopy:
    """A completed package where the database says it lies, with what was recorded of it."""

    package: str
    relative_path: str
    location: Endpoint
    size: int
    checksum: str
    algorithm: str


@dataclass(frozen=True)
class CopyCheck:
    copy: RecordedCopy
    path: str
    size: int
    checksum: str

    @property
    def ok(self) -> bool:
        return self.size == self.copy.size and self.checksum == self.copy.checksum


def recorded_copies(session: Session, package: str) -> list[RecordedCopy]:
    """The present copies of a completed package; an error names what is missing."""
    row = session.scalars(select(RawDataPackage).where(RawDataPackage.name == package)).first()
    if row is None:
        raise ConfigurationError(f"no package named {package!r}")
    if row.status != Status.COMPLETED or row.checksum is None or row.size is None:
        raise ConfigurationError(
            f"package {package!r} is {row.status.value}: only completed packages have a "
            "recorded checksum to verify against"
        )
    locations = session.scalars(
        select(DiskDataLocation)
        .join(
            RawDataPackagePhysicalCopy,
            RawDataPackagePhysicalCopy.data_location_id == DiskDataLocation.id,
        )
        .where(
            RawDataPackagePhysicalCopy.raw_data_package_id == row.id,
            RawDataPackagePhysicalCopy.status == PhysicalCopyStatus.PRESENT,
        )
        .order_by(DiskDataLocation.id)
    ).all()
    if not locations:
        raise ConfigurationError(f"package {package!r} has no present copy on record")
    return [
        RecordedCopy(
            package,
            row.relative_path,
            Endpoint.of(location),
            row.size,
            row.checksum,
            row.checksum_algorithm or "sha256",
        )
        for location in locations
    ]


def check_copy(hosts: Hosts, copy: RecordedCopy) -> CopyCheck:
    """Hash the copy again on the host that holds it (in-process when that is this machine,
    else over SSH): the archive's bytes never cross the network."""
    spec = tar_agent.ChecksumSpec(
        root=copy.location.root, relative_path=copy.relative_path, algorithm=copy.algorithm
    )
    result = hosts.runner_for(copy.location).run("checksum", spec)
    return CopyCheck(copy, str(result["path"]), int(result["size"]), str(result["checksum"]))
