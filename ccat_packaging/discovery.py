"""Finding work: SOURCE locations, their unpackaged file groups, and packages left unfinished.

A file group is (SOURCE location, executed obs unit, instrument module). Its key is also the
Dagster partition key, so everything a run needs can be derived from the key and the database.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import func, or_, select, tuple_
from sqlalchemy.orm import Session, selectinload

from ccat_packaging.errors import ConfigurationError
from ccat_packaging.models import (
    DataLocation,
    DiskDataLocation,
    LocationType,
    RawDataFile,
    RawDataPackage,
    Status,
)
from ccat_packaging.run_placement import check_overrides, queue_overrides, run_queue

_KEY = re.compile(r"^(?P<slug>[A-Za-z0-9_]+)__eou(?P<eou>\d+)__mod(?P<mod>\d+)$")


def location_slug(name: str) -> str:
    """A name usable in Dagster sensor names and partition keys (``[A-Za-z0-9_]``)."""
    slug = re.sub(r"[^A-Za-z0-9_]+", "_", name).strip("_")
    if not slug:
        raise ConfigurationError(f"data location name {name!r} has no usable characters")
    return slug


@dataclass(frozen=True)
class GroupKey:
    location_slug: str
    executed_obs_unit_id: int
    instrument_module_id: int

    def __str__(self) -> str:
        return (
            f"{self.location_slug}__eou{self.executed_obs_unit_id}__mod{self.instrument_module_id}"
        )

    @classmethod
    def parse(cls, key: str) -> GroupKey:
        match = _KEY.match(key)
        if match is None:
            raise ConfigurationError(
                f"{key!r} is not a file-group key (<location>__eou<id>__mod<id>)"
            )
        return cls(match["slug"], int(match["eou"]), int(match["mod"]))


@dataclass(frozen=True)
class SourceLocationRef:
    """What a sensor needs to know about its location, fixed when the code location loads."""

    id: int
    name: str
    slug: str
    host: str
    # The Celery queue its runs go to (run_placement).
    run_queue: str


@dataclass(frozen=True)
class FileGroup:
    key: GroupKey
    file_count: int
    total_bytes: int
    newest_filed_at: datetime


def source_locations(session: Session) -> list[SourceLocationRef]:
    """Active SOURCE disk locations, by id: one sensor each, unless ``sensor_name_clashes``
    finds two of them under one name."""
    rows = session.scalars(
        select(DiskDataLocation)
        .where(
            DiskDataLocation.location_type == LocationType.SOURCE,
            DiskDataLocation.active.is_(True),
        )
        .order_by(DiskDataLocation.id)
        .options(selectinload(DiskDataLocation.site))
    ).all()
    overrides = queue_overrides()
    if overrides:
        check_overrides(
            overrides,
            set(
                session.scalars(
                    select(DataLocation.name).where(
                        DataLocation.location_type == LocationType.SOURCE
                    )
                )
            ),
        )
    return [
        SourceLocationRef(
            r.id,
            r.name,
            location_slug(r.name),
            r.host,
            run_queue(r.name, r.site.short_name, overrides),
        )
        for r in rows
    ]


def sensor_name_clashes(locations: list[SourceLocationRef]) -> dict[str, list[str]]:
    """Slugs that more than one location maps to, with their names: such locations get no
    sensor or job, since neither sensor names nor group keys could tell their files apart."""
    by_slug: dict[str, list[str]] = {}
    for ref in locations:
        by_slug.setdefault(ref.slug, []).append(ref.name)
    return {slug: names for slug, names in by_slug.items() if len(names) > 1}


def source_location_for(session: Session, key: GroupKey) -> DiskDataLocation:
    """The one SOURCE disk location a group key names: the active one, else the one inactive
    one (old groups stay packable); several of either kind is a configuration error, never a
    guess."""
    candidates = session.scalars(
        select(DataLocation)
        .where(DataLocation.location_type == LocationType.SOURCE)
        .order_by(DataLocation.id)
    ).all()
    matches = [loc for loc in candidates if location_slug(loc.name) == key.location_slug]
    active = [loc for loc in matches if loc.active]
    chosen = active or matches
    if not chosen:
        raise ConfigurationError(f"no SOURCE location matches group key {key}")
    if len(chosen) > 1:
        names = ", ".join(repr(loc.name) for loc in chosen)
        raise ConfigurationError(
            f"group key {key} could mean SOURCE locations {names}; rename all but one"
        )
    [location] = chosen
    if not isinstance(location, DiskDataLocation):
        raise ConfigurationError(
            f"SOURCE location {location.name!r} has storage type {location.storage_type}; "
            "packaging reads from disk locations only"
        )
    return location


def unpackaged_groups(
    session: Session, location_id: int, filed_since: datetime | None, limit: int
) -> list[FileGroup]:
    """Groups with unpackaged files, oldest activity first: one set-based query, on indexes.

    ``filed_since`` restricts to groups whose newest unpackaged file was filed at or after it
    (the sensor's cursor); ``>=`` re-reads the boundary group rather than risk skipping a tie.
    A group qualifies exactly when one of its unpackaged files was filed at or after it, so the
    query starts from those files (``ix_raw_data_file_unpackaged_filed``) and aggregates only
    their groups: a tick when nothing changed reads nothing, however large the backlog.
    """
    unpackaged = (
        RawDataFile.source_location_id == location_id,
        RawDataFile.raw_data_package_id.is_(None),
    )
    group = (RawDataFile.executed_obs_unit_id, RawDataFile.instrument_module_id)
    newest = func.max(RawDataFile.created_at)
    stmt = (
        select(*group, func.count(), func.coalesce(func.sum(RawDataFile.size), 0), newest)
        .where(*unpackaged)
        .group_by(*group)
        .order_by(newest, *group)
        .limit(limit)
    )
    if filed_since is not None:
        recent = select(*group).where(*unpackaged, RawDataFile.created_at >= filed_since)
        stmt = stmt.where(tuple_(*group).in_(recent))
    location = session.get_one(DataLocation, location_id)
    slug = location_slug(location.name)
    return [
        FileGroup(GroupKey(slug, eou, mod), int(count), int(total), _aware(newest_at))
        for eou, mod, count, total, newest_at in session.execute(stmt)
    ]


def _aware(value: datetime) -> datetime:
    # SQLite returns naive datetimes for timezone-aware columns; everything we store is UTC.
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


@dataclass(frozen=True)
class SensorCursor:
    """Where a location sensor left off.

    ``since``: the newest filing time among groups already requested; the next tick starts
    there. ``seen``: groups requested at exactly that time (a tie must neither repeat nor be
    skipped). ``rescan_at``: when to start again from the beginning, which catches files whose
    transaction committed after the cursor passed their filing time.
    """

    since: datetime | None = None
    seen: tuple[str, ...] = ()
    rescan_at: float = 0.0

    def serialize(self) -> str:
        return json.dumps(
            {
                "since": self.since.isoformat() if self.since else None,
                "seen": list(self.seen),
                "rescan_at": self.rescan_at,
            }
        )

    @classmethod
    def parse(cls, raw: str | None) -> SensorCursor:
        if not raw:
            return cls()
        data = json.loads(raw)
        since = datetime.fromisoformat(data["since"]) if data.get("since") else None
        return cls(since, tuple(data.get("seen", ())), float(data.get("rescan_at", 0.0)))


@dataclass(frozen=True)
class TickPlan:
    groups: list[FileGroup]
    cursor: SensorCursor
    rescanned: bool


def plan_tick(
    session: Session,
    location_id: int,
    cursor: SensorCursor,
    now: float,
    limit: int,
    rescan_seconds: int,
) -> TickPlan:
    """The groups one tick requests (at most ``limit``) and the cursor for the next tick."""
    rescan = now >= cursor.rescan_at
    since = None if rescan else cursor.since
    seen = set() if rescan else set(cursor.seen)
    # Read a few extra rows so the tie-break filter below cannot shrink a full page to nothing.
    rows = unpackaged_groups(session, location_id, since, limit + len(seen))
    groups = [g for g in rows if not (g.newest_filed_at == since and str(g.key) in seen)][:limit]
    rescan_at = now + rescan_seconds if rescan else cursor.rescan_at
    if not groups:
        return TickPlan([], SensorCursor(since, tuple(sorted(seen)), rescan_at), rescan)
    newest = groups[-1].newest_filed_at
    at_newest = {str(g.key) for g in groups if g.newest_filed_at == newest}
    if newest == since:
        at_newest |= seen
    return TickPlan(groups, SensorCursor(newest, tuple(sorted(at_newest)), rescan_at), rescan)


@dataclass(frozen=True)
class StalePackage:
    key: GroupKey
    package_id: int
    heartbeat_at: datetime
    name: str
    # None: no run holds it (requeued, or released by an interrupted step); else the run
    # whose heartbeat stopped.
    lease_owner: str | None


def packages_needing_a_run(
    session: Session, location_id: int, older_than: datetime
) -> list[StalePackage]:
    """Unfinished packages no live run holds: their run died (kill -9, reboot) and the
    heartbeat stopped, or an operator requeued them. Their group needs a run to resume them."""
    location = session.get_one(DataLocation, location_id)
    slug = location_slug(location.name)
    rows = session.execute(
        select(
            RawDataPackage.id,
            RawDataPackage.executed_obs_unit_id,
            RawDataPackage.instrument_module_id,
            RawDataPackage.updated_at,
            RawDataPackage.name,
            RawDataPackage.lease_owner,
        )
        .where(
            RawDataPackage.source_location_id == location_id,
            RawDataPackage.status.in_([Status.PENDING, Status.SCHEDULED, Status.IN_PROGRESS]),
            or_(RawDataPackage.updated_at < older_than, RawDataPackage.lease_owner.is_(None)),
        )
        .order_by(RawDataPackage.updated_at)
    ).all()
    return [
        StalePackage(GroupKey(slug, eou, mod), pid, _aware(at), name, owner)
        for pid, eou, mod, at, name, owner in rows
    ]


def unfinished_groups(session: Session, location_id: int) -> list[GroupKey]:
    """Groups with a package that is not completed (pending, scheduled, in progress or
    failed): a run of the group builds or re-drives it, so its partition must exist even when
    none of its files is unpackaged any more. One ``GROUP BY`` on the status index."""
    location = session.get_one(DataLocation, location_id)
    slug = location_slug(location.name)
    group = (RawDataPackage.executed_obs_unit_id, RawDataPackage.instrument_module_id)
    rows = session.execute(
        select(*group)
        .where(
            RawDataPackage.source_location_id == location_id,
            RawDataPackage.status.in_(
                [Status.PENDING, Status.SCHEDULED, Status.IN_PROGRESS, Status.FAILED]
            ),
        )
        .group_by(*group)
        .order_by(*group)
    ).all()
    return [GroupKey(slug, eou, mod) for eou, mod in rows]


@dataclass(frozen=True)
class Discovery:
    """The groups of one location whose partitions one discovery tick makes sure exist, and
    the location's cursor for the next tick."""

    keys: list[str]
    cursor: SensorCursor
    rescanned: bool


def discover_groups(
    session: Session,
    location_id: int,
    cursor: SensorCursor,
    now: float,
    page: int,
    rescan_seconds: int,
) -> Discovery:
    """Groups with unpackaged files filed since the cursor (at most ``page``, the location
    sensor's own ``plan_tick``), and on a rescan also every unfinished package's group: a tick
    when nothing was filed reads nothing, however many groups exist."""
    tick = plan_tick(session, location_id, cursor, now, page, rescan_seconds)
    keys = [str(g.key) for g in tick.groups]
    if tick.rescanned:
        keys += [str(k) for k in unfinished_groups(session, location_id) if str(k) not in keys]
    return Discovery(keys, tick.cursor, tick.rescanned)


def parse_discovery_cursor(raw: str | None) -> dict[str, SensorCursor]:
    """The discovery sensor's cursor: one ``SensorCursor`` per location slug."""
    if not raw:
        return {}
    return {slug: SensorCursor.parse(value) for slug, value in json.loads(raw).items()}


def serialize_discovery_cursor(cursors: dict[str, SensorCursor]) -> str:
    return json.dumps({slug: cursor.serialize() for slug, cursor in sorted(cursors.items())})
