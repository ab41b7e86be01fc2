"""Creating a package record and claiming its files, atomically.

A file is claimed by a conditional ``UPDATE ... WHERE raw_data_package_id IS NULL``: whatever
runs concurrently, the database lets exactly one package have each file. An unfinished package
of the group (from a crashed or retried run) is resumed before any new part is started, so
re-running a group converges instead of multiplying packages. A group larger than the size or
member cap is split into deterministic numbered parts; files filed after a part was built go
into a new part, so a completed package is never rewritten.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import ColumnElement, CursorResult, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ccat_packaging import settings
from ccat_packaging.buffer_choice import buffer_candidates
from ccat_packaging.discovery import GroupKey, source_location_for
from ccat_packaging.errors import ClaimConflictError
from ccat_packaging.models import DiskDataLocation, RawDataFile, RawDataPackage, Status
from ccat_packaging.plans import Endpoint, PackagePlan
from ccat_packaging.registration import reset_failed

UNFINISHED = (Status.PENDING, Status.SCHEDULED, Status.IN_PROGRESS)


def package_name(key: GroupKey, part: int) -> str:
    return f"{key}__part{part:03d}"


def package_relative_path(key: GroupKey, part: int) -> str:
    return f"{key.location_slug}/eou{key.executed_obs_unit_id}/{package_name(key, part)}.tar"


@dataclass(frozen=True)
class PackageLimits:
    max_bytes: int
    max_files: int

    @classmethod
    def configured(cls) -> PackageLimits:
        """The caps set by ``CCAT_PACKAGE_MAX_BYTES`` and ``CCAT_PACKAGE_MAX_FILES``."""
        return cls(settings.package_max_bytes(), settings.package_max_files())


def path_order(path: str) -> bytes:
    """Member order is by the bytes of the path, not a database collation, so the archive is
    the same whichever database or locale produced the list."""
    return path.encode("utf-8", "surrogateescape")


def split_into_parts(
    files: list[tuple[str, int]], limits: PackageLimits
) -> list[list[tuple[str, int]]]:
    """Deterministic parts: files in path order, each part filled up to the caps.

    A single file above the byte cap gets a part of its own (a file is never split).
    """
    parts: list[list[tuple[str, int]]] = []
    current: list[tuple[str, int]] = []
    current_bytes = 0
    for path, size in sorted(files, key=lambda f: path_order(f[0])):
        if current and (
            current_bytes + size > limits.max_bytes or len(current) >= limits.max_files
        ):
            parts.append(current)
            current, current_bytes = [], 0
        current.append((path, size))
        current_bytes += size
    if current:
        parts.append(current)
    return parts


def claim_packages(
    session: Session,
    key: GroupKey,
    limits: PackageLimits,
    owner: str,
    *,
    redrive_failed: bool = False,
) -> list[PackagePlan]:
    """Every package this group needs built now: unfinished ones first (a crashed or
    interrupted run's), then new parts holding the group's unclaimed files, leased to
    ``owner`` (the claiming run) so no other run starts on them meanwhile.

    Raises NoActiveBufferError before claiming anything when the site has no buffer.
    Completed packages are never rebuilt. Failed ones wait for an operator: with
    ``redrive_failed`` (a run an operator launched) they are taken back, with a fresh retry
    budget, before the unfinished ones are listed.
    """
    source = source_location_for(session, key)
    buffer_candidates(session, source.site_id)
    if redrive_failed:
        reset_failed(session, *_group_filter(key, source.id), owner=owner)
    packages = list(
        session.scalars(
            select(RawDataPackage)
            .where(*_group_filter(key, source.id), RawDataPackage.status.in_(UNFINISHED))
            .order_by(RawDataPackage.part)
        )
    )
    packages += _new_parts(session, key, source.id, limits, owner)
    return [plan_for(session, package, key, source) for package in packages]


def plan_for(
    session: Session, package: RawDataPackage, key: GroupKey, source: DiskDataLocation
) -> PackagePlan:
    rows = session.execute(
        select(
            RawDataFile.relative_path,
            RawDataFile.size,
            RawDataFile.checksum_algorithm,
            RawDataFile.checksum,
        ).where(RawDataFile.raw_data_package_id == package.id)
    ).all()
    members = tuple(sorted(((p, int(s)) for p, s, _, _ in rows), key=lambda m: path_order(m[0])))
    # A checksum filed without its algorithm is taken as sha256, the archive standard.
    filed = tuple(sorted((p, alg or "sha256", value) for p, _, alg, value in rows if value))
    return PackagePlan(
        package_id=package.id,
        name=package.name,
        group_key=str(key),
        part=package.part,
        relative_path=package.relative_path,
        source=Endpoint.of(source),
        source_site_id=source.site_id,
        members=members,
        filed_checksums=filed,
    )


def _group_filter(key: GroupKey, location_id: int) -> tuple[ColumnElement[bool], ...]:
    return (
        RawDataPackage.source_location_id == location_id,
        RawDataPackage.executed_obs_unit_id == key.executed_obs_unit_id,
        RawDataPackage.instrument_module_id == key.instrument_module_id,
    )


def _new_parts(
    session: Session, key: GroupKey, location_id: int, limits: PackageLimits, owner: str
) -> list[RawDataPackage]:
    """Claim the group's unclaimed files into new numbered parts.

    ``FOR UPDATE`` makes a concurrent claimer of the same group wait on PostgreSQL and then
    see the files as claimed; the conditional UPDATE is the guarantee on every backend: if it
    claims fewer rows than selected, another claimer won and this transaction gives up.
    """
    unclaimed = session.execute(
        select(RawDataFile.id, RawDataFile.relative_path, RawDataFile.size)
        .where(
            RawDataFile.source_location_id == location_id,
            RawDataFile.executed_obs_unit_id == key.executed_obs_unit_id,
            RawDataFile.instrument_module_id == key.instrument_module_id,
            RawDataFile.raw_data_package_id.is_(None),
        )
        .with_for_update()
    ).all()
    if not unclaimed:
        return []
    ids_by_path = {path: file_id for file_id, path, _ in unclaimed}
    last_part = session.scalar(
        select(func.max(RawDataPackage.part)).where(*_group_filter(key, location_id))
    )
    created = []
    for offset, files in enumerate(
        split_into_parts([(p, int(s)) for _, p, s in unclaimed], limits), start=1
    ):
        part = (last_part or 0) + offset
        package = RawDataPackage(
            name=package_name(key, part),
            relative_path=package_relative_path(key, part),
            status=Status.PENDING,
            lease_owner=owner,
            source_location_id=location_id,
            executed_obs_unit_id=key.executed_obs_unit_id,
            instrument_module_id=key.instrument_module_id,
            part=part,
        )
        # No savepoint: a conflict abandons the whole transaction anyway, and on SQLite
        # (pysqlite begins no transaction before the SELECTs above) releasing the savepoint
        # would commit the part at once, leaving it behind empty when the claim fails.
        session.add(package)
        try:
            session.flush()
        except IntegrityError:
            raise ClaimConflictError(
                f"{key}: part {part} was created by another run at the same moment"
            ) from None
        ids = [ids_by_path[path] for path, _ in files]
        result = session.execute(
            update(RawDataFile)
            .where(RawDataFile.id.in_(ids), RawDataFile.raw_data_package_id.is_(None))
            .values(raw_data_package_id=package.id)
            .execution_options(synchronize_session=False)
        )
        if cast(CursorResult[Any], result).rowcount != len(ids):
            raise ClaimConflictError(
                f"{key}: another run claimed some of these files at the same moment"
            )
        created.append(package)
    return created
