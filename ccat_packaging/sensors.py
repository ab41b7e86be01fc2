"""One sensor per SOURCE location, built from the database when the code location loads, and
the discovery sensor that registers every location's file groups as partitions."""

import contextlib
import time
from typing import TYPE_CHECKING

import dagster as dg
from sqlalchemy.exc import SQLAlchemyError

from ccat_packaging import names, settings
from ccat_packaging.buffer_choice import buffer_candidates
from ccat_packaging.db import unavailable
from ccat_packaging.discovery import (
    SensorCursor,
    SourceLocationRef,
    discover_groups,
    packages_needing_a_run,
    parse_discovery_cursor,
    plan_tick,
    serialize_discovery_cursor,
)
from ccat_packaging.errors import ConfigurationError, DatabaseUnavailableError
from ccat_packaging.models import DataLocation
from ccat_packaging.registration import stale_cutoff
from ccat_packaging.resources import OpsDatabase

if TYPE_CHECKING:
    # The type define_asset_job returns: Dagster 1.13 does not export it.
    from dagster._core.definitions.unresolved_asset_job_definition import (
        UnresolvedAssetJobDefinition,
    )


def run_key(group_key: str, file_count: int, newest_filed_at: float) -> str:
    """Changes when a file joins the group, so late files get a run of their own, while the
    same unchanged group is launched at most once (Dagster never reuses a run key)."""
    return f"{group_key}:{file_count}:{newest_filed_at:.6f}"


def prepare_pool(instance: dg.DagsterInstance, pool: str) -> None:
    """Create a host pool's limit (``concurrency.pools.default_limit``) before its runs start.

    Dagster 1.13 creates it at the first claim of a step, and when two runs make that first
    claim at the same moment on PostgreSQL, the loser's run dies (a unique violation aborts its
    transaction). A tick creates it before requesting the runs; should the tick of another
    location on the same host create it at the same moment, one of the two wins, which is fine.
    """
    storage = instance.event_log_storage
    default = instance.global_op_concurrency_default_limit
    if default is None or not storage.supports_global_concurrency_limits:
        return
    current = next((p for p in storage.get_pool_limits() if p.name == pool), None)
    if current is not None and not (current.from_default and current.limit != default):
        return
    with contextlib.suppress(SQLAlchemyError):
        storage.initialize_concurrency_limit_to_default(pool)


def build_source_location_sensor(
    location: SourceLocationRef, job: "UnresolvedAssetJobDefinition"
) -> dg.SensorDefinition:
    partitions = dg.DynamicPartitionsDefinition(name=names.partitions_name(location.slug))

    @dg.sensor(
        name=names.sensor_name(location.slug),
        job=job,
        minimum_interval_seconds=settings.sensor_interval_seconds(),
        description=(
            f"Packages unpackaged raw files at SOURCE location {location.name!r} "
            f"(host {location.host}), one run per (executed obs unit, instrument module)."
        ),
        default_status=dg.DefaultSensorStatus.STOPPED,
    )
    def _sensor(context: dg.SensorEvaluationContext, ops_db: OpsDatabase) -> dg.SensorResult:
        cursor = SensorCursor.parse(context.cursor)
        try:
            with ops_db.session() as session:
                row = session.get(DataLocation, location.id)
                if row is None or not row.active:
                    return dg.SensorResult(
                        skip_reason=f"location {location.name!r} is no longer an active SOURCE; "
                        "reload the code location to drop this sensor"
                    )
                # Raises NoActiveBufferError: the tick fails visibly instead of skipping.
                # Which buffer a package goes to is decided when it is assembled.
                buffers = [b.name for b in buffer_candidates(session, row.site_id)]
                tick = plan_tick(
                    session,
                    location.id,
                    cursor,
                    now=time.time(),
                    limit=settings.sensor_max_requests(),
                    rescan_seconds=settings.sensor_rescan_seconds(),
                )
                stale = packages_needing_a_run(session, location.id, older_than=stale_cutoff())
        except SQLAlchemyError as exc:
            # A failed tick, red in the UI, with one line instead of a driver traceback.
            down = unavailable(exc)
            if down is None:
                raise
            raise DatabaseUnavailableError(f"{down}; the next tick tries again") from None
        requests = [
            dg.RunRequest(
                run_key=run_key(str(g.key), g.file_count, g.newest_filed_at.timestamp()),
                partition_key=str(g.key),
                tags={
                    names.SOURCE_LOCATION_TAG: location.name,
                    names.SOURCE_HOST_TAG: location.host,
                    names.FILES_TAG: str(g.file_count),
                    names.BYTES_TAG: str(g.total_bytes),
                },
            )
            for g in tick.groups
        ]
        # A package whose heartbeat stopped belongs to a run that died; a run of its group
        # resumes it (failure_policy, path 3). The key changes whenever a run touches the
        # package again.
        requested = [str(g.key) for g in tick.groups]
        for package in stale:
            if str(package.key) in requested:
                continue
            requested.append(str(package.key))
            requests.append(
                dg.RunRequest(
                    run_key=f"{package.key}:resume:{package.package_id}:"
                    f"{package.heartbeat_at.timestamp():.6f}",
                    partition_key=str(package.key),
                    tags={
                        names.SOURCE_LOCATION_TAG: location.name,
                        names.SOURCE_HOST_TAG: location.host,
                        names.RESUME_PACKAGE_TAG: str(package.package_id),
                    },
                )
            )
        if not requests:
            return dg.SensorResult(
                skip_reason=f"no new unpackaged files at {location.name!r}",
                cursor=tick.cursor.serialize(),
            )
        prepare_pool(context.instance, names.host_pool(location.host))
        context.log.info(
            f"{len(tick.groups)} group(s) to package and {len(stale)} stale package(s) to resume "
            f"at {location.name!r} (buffers by preference: {', '.join(buffers)}"
            f"{', full rescan' if tick.rescanned else ''})"
        )
        return dg.SensorResult(
            run_requests=requests,
            dynamic_partitions_requests=[partitions.build_add_request(requested)],
            cursor=tick.cursor.serialize(),
        )

    return _sensor


# Groups one discovery tick registers per location at most; more wait for the next tick. The
# daemon checks each requested key with one query, so only keys not yet registered are sent.
DISCOVERY_PAGE = 1000
# Up to this many keys are checked one query each; more, against one read of all registered
# keys. Measured on SQLite: 6 ms per check, 13 ms to read 5000 keys.
CHECK_ONE_BY_ONE = 20


def unregistered(instance: dg.DagsterInstance, partitions: str, keys: list[str]) -> list[str]:
    """The keys not yet in the partition set: a tick past its cursor finds a few groups, and
    a few point checks beat reading thousands of keys; a rescan's page is the other way."""
    if len(keys) <= CHECK_ONE_BY_ONE:
        return [k for k in keys if not instance.has_dynamic_partition(partitions, k)]
    registered = set(instance.get_dynamic_partitions(partitions))
    return [k for k in keys if k not in registered]


def build_discovery_sensor(locations: list[SourceLocationRef]) -> dg.SensorDefinition:
    """Registers the partition of every group with unpackaged files (and of every unfinished
    package's group) in its location's partition set, and launches nothing: with a location's
    sensor stopped, a new group still shows as a missing partition that an operator can
    backfill or materialize from the UI."""

    @dg.sensor(
        name=names.DISCOVERY_SENSOR,
        minimum_interval_seconds=settings.sensor_interval_seconds(),
        description=(
            "Registers each SOURCE location's file groups with unpackaged files or unfinished "
            "packages as partitions of its job; launches no runs."
        ),
        default_status=dg.DefaultSensorStatus.RUNNING,
    )
    def _discovery(context: dg.SensorEvaluationContext, ops_db: OpsDatabase) -> dg.SensorResult:
        cursors = parse_discovery_cursor(context.cursor)
        found: dict[str, list[str]] = {}
        now = time.time()
        try:
            with ops_db.session() as session:
                for location in locations:
                    if session.get(DataLocation, location.id) is None:
                        continue  # deleted since the load; the next reload drops it
                    discovery = discover_groups(
                        session,
                        location.id,
                        cursors.get(location.slug, SensorCursor()),
                        now=now,
                        page=DISCOVERY_PAGE,
                        rescan_seconds=settings.sensor_rescan_seconds(),
                    )
                    cursors[location.slug] = discovery.cursor
                    found[location.slug] = discovery.keys
        except SQLAlchemyError as exc:
            down = unavailable(exc)
            if down is None:
                raise
            raise DatabaseUnavailableError(f"{down}; the next tick tries again") from None
        requests = []
        counts = []
        for location in locations:
            partitions = names.partitions_name(location.slug)
            new = unregistered(context.instance, partitions, found.get(location.slug, []))
            if new:
                requests.append(dg.AddDynamicPartitionsRequest(partitions, new))
                # A backfill of these from the UI starts several runs at once.
                prepare_pool(context.instance, names.host_pool(location.host))
            counts.append(f"{location.name!r} {len(new)}")
        return dg.SensorResult(
            skip_reason=f"new partitions registered: {', '.join(counts) or 'no locations'}",
            dynamic_partitions_requests=requests,
            cursor=serialize_discovery_cursor(
                {loc.slug: cursors[loc.slug] for loc in locations if loc.slug in cursors}
            ),
        )

    return _discovery


def build_clash_sensor(slug: str, locations: list[str]) -> dg.SensorDefinition:
    """Stands where the sensor of two SOURCE locations with one name would be: every tick
    fails naming them, so the UI says what to fix, while every other location's sensor and
    job load as usual."""
    problem = (
        f"SOURCE locations {', '.join(map(repr, locations))} map to the same sensor name "
        f"{slug!r}: none of them is packaged until all but one are renamed (then reload the "
        "code location)"
    )

    @dg.sensor(
        name=names.sensor_name(slug),
        minimum_interval_seconds=settings.sensor_interval_seconds(),
        description=problem,
        default_status=dg.DefaultSensorStatus.RUNNING,
    )
    def _clash(context: dg.SensorEvaluationContext) -> dg.SensorResult:
        raise ConfigurationError(problem)

    return _clash
