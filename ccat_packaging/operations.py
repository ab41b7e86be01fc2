"""What operators ask of the packaging stage, as plain functions over the database.

The ``ccat-packaging`` command prints these. They never touch source files; ``verify`` reads
a published package where it lies, on its buffer's host.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import PurePosixPath

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ccat_packaging.assembly import tar_agent
from ccat_packaging.assembly.hosts import Hosts
from ccat_packaging.buffer_choice import buffer_candidates, primary_buffer
from ccat_packaging.discovery import (
    GroupKey,
    StalePackage,
    location_slug,
    packages_needing_a_run,
    source_location_for,
    source_locations,
    unfinished_groups,
    unpackaged_groups,
)
from ccat_packaging.errors import ConfigurationError, PackagingError
from ccat_packaging.models import (
    DataLocation,
    DiskDataLocation,
    LocationType,
    PhysicalCopyStatus,
    RawDataFile,
    RawDataPackage,
    RawDataPackagePhysicalCopy,
    Status,
)
from ccat_packaging.plans import Endpoint
from ccat_packaging.registration import reset_failed, stale_cutoff

# The window of the backlog's "recently" counts: packages completed and failed in it.
RECENT = timedelta(hours=1)


@dataclass(frozen=True)
class LocationBacklog:
    """One SOURCE location's backlog at ``at``: what waits to be packaged and how packaging
    fared in the last ``RECENT``."""

    location: str
    slug: str
    site_id: int
    at: datetime
    files: int
    bytes: int
    oldest_filed_at: datetime | None
    packages_by_status: dict[str, int]
    completed_recently: int
    failed_recently: int

    @property
    def oldest_age_seconds(self) -> float:
        """How long the oldest unpackaged file has waited; 0 when none waits."""
        if self.oldest_filed_at is None:
            return 0.0
        return max(0.0, (self.at - self.oldest_filed_at).total_seconds())

    @property
    def failed(self) -> int:
        return self.packages_by_status.get(Status.FAILED.value, 0)

    def metrics(self) -> dict[str, int | float]:
        """The numbers recorded over time, by the names the backlog asset's metadata and
        InfluxDB both use."""
        return {
            "unpackaged_files": self.files,
            "unpackaged_bytes": self.bytes,
            "oldest_unpackaged_age_seconds": round(self.oldest_age_seconds, 3),
            "completed_last_hour": self.completed_recently,
            "failed_last_hour": self.failed_recently,
            "failed": self.failed,
        }


def backlog(session: Session) -> list[LocationBacklog]:
    """Per active SOURCE location: unpackaged files and bytes, the oldest one's filing time,
    packages by status, and those completed and failed in the last ``RECENT`` (a package's
    ``updated_at`` is when it reached its final status)."""
    now = datetime.now(UTC)
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
        packages = RawDataPackage.source_location_id == ref.id
        by_status = dict(
            session.execute(
                select(RawDataPackage.status, func.count())
                .where(packages)
                .group_by(RawDataPackage.status)
            ).all()
        )
        recent = dict(
            session.execute(
                select(RawDataPackage.status, func.count())
                .where(
                    packages,
                    RawDataPackage.status.in_([Status.COMPLETED, Status.FAILED]),
                    RawDataPackage.updated_at >= now - RECENT,
                )
                .group_by(RawDataPackage.status)
            ).all()
        )
        result.append(
            LocationBacklog(
                ref.name,
                ref.slug,
                session.get_one(DataLocation, ref.id).site_id,
                now,
                int(files),
                int(total),
                oldest.replace(tzinfo=oldest.tzinfo or UTC) if oldest else None,
                {str(status.value): int(n) for status, n in by_status.items()},
                int(recent.get(Status.COMPLETED, 0)),
                int(recent.get(Status.FAILED, 0)),
            )
        )
    return result


# More parts than one file group ever has (each is up to CCAT_PACKAGE_MAX_BYTES).
GROUP_LIMIT = 10_000


@dataclass(frozen=True)
class BufferSpace:
    """The free space of one BUFFER's file system, or why it is not known; ``location`` and
    ``host`` are empty when the site has no buffer to measure."""

    location: str
    host: str
    free: int | None
    total: int | None
    problem: str | None

    @property
    def shown(self) -> str:
        """How messages name it."""
        return f"buffer {self.location} on {self.host}" if self.location else "the site's buffers"


def buffer_space(session: Session, hosts: Hosts, site_id: int) -> list[BufferSpace]:
    """The free space of each active BUFFER of the site, asked of the host that holds it
    (``statvfs`` in-process when that is this machine, the agent over SSH otherwise). A buffer
    that does not answer is reported with its problem: the others are still measured."""
    try:
        buffers = [Endpoint.of(b) for b in buffer_candidates(session, site_id)]
    except ConfigurationError as exc:
        return [BufferSpace("", "", None, None, str(exc))]
    spaces = []
    for buffer in buffers:
        try:
            spec = tar_agent.FreeSpaceSpec(root=buffer.root)
            result = hosts.runner_for(buffer).run("free_space", spec)
        except PackagingError as exc:  # unreachable host, refused key, root not allowed ...
            problem = f"{type(exc).__name__}: {exc}"
            spaces.append(BufferSpace(buffer.location_name, buffer.host, None, None, problem))
        else:
            spaces.append(
                BufferSpace(
                    buffer.location_name,
                    buffer.host,
                    int(result["free"]),
                    int(result["total"]),
                    None,
                )
            )
    return spaces


@dataclass(frozen=True)
class PackageListing:
    """One package as an operator looks for it: what it holds, where it lies, why it failed."""

    name: str
    status: str
    files: int
    size: int | None
    checksum: str | None
    algorithm: str | None
    buffer_path: str | None
    failure_reason: str | None
    updated_at: datetime


def list_packages(
    session: Session,
    status: Status | None = None,
    location: str | None = None,
    older_than: timedelta | None = None,
    limit: int = 100,
    group: GroupKey | None = None,
) -> list[PackageListing]:
    """Up to ``limit`` packages, oldest change first. ``location`` matches the SOURCE they
    came from or a location holding a copy; ``older_than`` keeps those unchanged for at least
    that long, so a package stuck in one state is found among thousands; ``group`` keeps the
    parts of one file group (what its partition of the packages asset covers)."""
    files = (
        select(RawDataFile.raw_data_package_id, func.count().label("n"))
        .where(RawDataFile.raw_data_package_id.is_not(None))
        .group_by(RawDataFile.raw_data_package_id)
        .subquery()
    )
    query = (
        select(RawDataPackage, func.coalesce(files.c.n, 0))
        .outerjoin(files, files.c.raw_data_package_id == RawDataPackage.id)
        .order_by(RawDataPackage.updated_at, RawDataPackage.id)
        .limit(limit)
    )
    if status is not None:
        query = query.where(RawDataPackage.status == status)
    if location is not None:
        loc = session.scalars(select(DataLocation).where(DataLocation.name == location)).first()
        if loc is None:
            raise ConfigurationError(f"no location named {location!r}")
        copy_here = select(RawDataPackagePhysicalCopy.raw_data_package_id).where(
            RawDataPackagePhysicalCopy.data_location_id == loc.id
        )
        query = query.where(
            (RawDataPackage.source_location_id == loc.id) | RawDataPackage.id.in_(copy_here)
        )
    if older_than is not None:
        query = query.where(RawDataPackage.updated_at < datetime.now(UTC) - older_than)
    if group is not None:
        query = query.where(
            RawDataPackage.source_location_id == source_location_for(session, group).id,
            RawDataPackage.executed_obs_unit_id == group.executed_obs_unit_id,
            RawDataPackage.instrument_module_id == group.instrument_module_id,
        )
    rows = session.execute(query).all()
    paths = _copy_paths(session, [package.id for package, _ in rows])
    return [
        PackageListing(
            package.name,
            package.status.value,
            int(count),
            package.size,
            package.checksum,
            package.checksum_algorithm,
            paths.get(package.id),
            package.failure_reason,
            package.updated_at.replace(tzinfo=package.updated_at.tzinfo or UTC),
        )
        for package, count in rows
    ]


def _copy_paths(session: Session, package_ids: list[int]) -> dict[int, str]:
    """Where each package's first present copy lies: its location's root joined with the
    package's relative path."""
    rows = session.execute(
        select(RawDataPackage.id, DiskDataLocation.path, RawDataPackage.relative_path)
        .join(
            RawDataPackagePhysicalCopy,
            RawDataPackagePhysicalCopy.raw_data_package_id == RawDataPackage.id,
        )
        .join(DiskDataLocation, DiskDataLocation.id == RawDataPackagePhysicalCopy.data_location_id)
        .where(
            RawDataPackage.id.in_(package_ids),
            RawDataPackagePhysicalCopy.status == PhysicalCopyStatus.PRESENT,
        )
        .order_by(DiskDataLocation.id)
    ).all()
    paths: dict[int, str] = {}
    for pid, root, rel in rows:
        paths.setdefault(pid, str(PurePosixPath(root) / rel))
    return paths


@dataclass(frozen=True)
class DryRunResume:
    """An unfinished package the sensor would request a run of its group for, and why."""

    key: str
    package: str
    reason: str


@dataclass(frozen=True)
class DryRunLocation:
    location: str
    buffer: str | None
    problem: str | None
    groups: list[tuple[str, int, int]]
    resumes: list[DryRunResume]


def _why_it_needs_a_run(package: StalePackage, now: datetime) -> str:
    if package.lease_owner is None:
        return "no run holds it: requeued by an operator, or released by an interrupted step"
    minutes = (now - package.heartbeat_at).total_seconds() / 60
    return f"its run's heartbeat stopped {minutes:.0f} min ago (lease {package.lease_owner})"


def dry_run(session: Session, limit: int = 1000) -> list[DryRunLocation]:
    """What each location's sensor would request from scratch, without changing anything: runs
    for unpackaged files' groups, and for unfinished packages no live run holds (the same
    ``packages_needing_a_run`` the sensor asks)."""
    result = []
    for ref in source_locations(session):
        location = session.get_one(DataLocation, ref.id)
        try:
            buffer: str | None = primary_buffer(session, location.site_id).name
            problem = None
        except ConfigurationError as exc:
            buffer, problem = None, str(exc)
        groups = unpackaged_groups(session, ref.id, None, limit)
        stale = packages_needing_a_run(session, ref.id, older_than=stale_cutoff())
        now = datetime.now(UTC)
        result.append(
            DryRunLocation(
                ref.name,
                buffer,
                problem,
                [(str(g.key), g.file_count, g.total_bytes) for g in groups],
                [DryRunResume(str(p.key), p.name, _why_it_needs_a_run(p, now)) for p in stale],
            )
        )
    return result


@dataclass(frozen=True)
class Requeued:
    """A package taken back, with the group (partition) a run must be launched for."""

    name: str
    location: str
    location_slug: str
    # The SOURCE location's host: whose assembly pool its run waits for.
    host: str
    key: str


def requeue_failed(
    session: Session, package: str | None = None, location: str | None = None
) -> list[Requeued]:
    """Failed packages back to ``pending`` with a fresh retry budget; a run of each one's
    group builds it (the location's sensor requests it if started, or a backfill). Returns
    those requeued, by name."""
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
    rows = session.execute(
        select(
            RawDataPackage.name,
            DiskDataLocation.name,
            DiskDataLocation.host,
            RawDataPackage.executed_obs_unit_id,
            RawDataPackage.instrument_module_id,
        )
        .join(DiskDataLocation, DiskDataLocation.id == RawDataPackage.source_location_id)
        .where(RawDataPackage.name.in_(names))
        .order_by(RawDataPackage.name)
    ).all()
    requeued = []
    for name, location_name, host, eou, mod in rows:
        slug = location_slug(location_name)
        requeued.append(Requeued(name, location_name, slug, host, str(GroupKey(slug, eou, mod))))
    return requeued


# More groups than this in one backfill is a backlog for the location's sensor, not a recipe.
MAX_BACKFILL_GROUPS = 10_000


@dataclass(frozen=True)
class BackfillTarget:
    """The groups (partitions) of one SOURCE location that a backfill launches runs of."""

    location: str
    slug: str
    host: str
    keys: list[str]


def backfill_groups(session: Session, location: str, keys: list[str]) -> BackfillTarget:
    """The named groups of a SOURCE location, each checked to have files there; none named:
    every group with unpackaged files or an unfinished package (``failed`` included: a
    backfill re-drives it), the same groups the discovery sensor registers."""
    row = session.scalars(
        select(DiskDataLocation).where(
            DiskDataLocation.name == location,
            DiskDataLocation.location_type == LocationType.SOURCE,
        )
    ).one_or_none()
    if row is None:
        raise ConfigurationError(
            f"no SOURCE location named {location!r} (`ccat-packaging status` lists them)"
        )
    slug = location_slug(row.name)
    if keys:
        for key in keys:
            group = GroupKey.parse(key)
            has_files = group.location_slug == slug and session.scalar(
                select(func.count())
                .select_from(RawDataFile)
                .where(
                    RawDataFile.source_location_id == row.id,
                    RawDataFile.executed_obs_unit_id == group.executed_obs_unit_id,
                    RawDataFile.instrument_module_id == group.instrument_module_id,
                )
            )
            if not has_files:
                raise ConfigurationError(
                    f"group {key} has no files at {location!r} "
                    "(`ccat-packaging dry-run` lists the groups waiting)"
                )
        return BackfillTarget(row.name, slug, row.host, list(dict.fromkeys(keys)))
    waiting = [
        str(g.key) for g in unpackaged_groups(session, row.id, None, MAX_BACKFILL_GROUPS + 1)
    ]
    found = list(dict.fromkeys([*waiting, *(str(k) for k in unfinished_groups(session, row.id))]))
    if len(found) > MAX_BACKFILL_GROUPS:
        raise ConfigurationError(
            f"more than {MAX_BACKFILL_GROUPS} groups wait at {location!r}: start its sensor, "
            "or name groups with --group"
        )
    return BackfillTarget(row.name, slug, row.host, found)


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
