"""One sensor per SOURCE location, built from the database when the code location loads."""

import contextlib
import time
from datetime import UTC, datetime, timedelta

import dagster as dg
from sqlalchemy.exc import SQLAlchemyError

from ccat_packaging import settings
from ccat_packaging.db import unavailable
from ccat_packaging.discovery import (
    SensorCursor,
    SourceLocationRef,
    packages_needing_a_run,
    plan_tick,
    primary_buffer,
)
from ccat_packaging.errors import DatabaseUnavailableError
from ccat_packaging.jobs import host_pool, partitions_name
from ccat_packaging.models import DataLocation
from ccat_packaging.resources import OpsDatabase


def sensor_name(location: SourceLocationRef) -> str:
    return f"package_{location.slug}_sensor"


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
    location: SourceLocationRef, job: dg.JobDefinition
) -> dg.SensorDefinition:
    partitions = dg.DynamicPartitionsDefinition(name=partitions_name(location.slug))

    @dg.sensor(
        name=sensor_name(location),
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
                buffer = primary_buffer(session, row.site_id)
                tick = plan_tick(
                    session,
                    location.id,
                    cursor,
                    now=time.time(),
                    limit=settings.sensor_max_requests(),
                    rescan_seconds=settings.sensor_rescan_seconds(),
                )
                stale = packages_needing_a_run(
                    session,
                    location.id,
                    older_than=datetime.now(UTC)
                    - timedelta(seconds=settings.stale_after_seconds()),
                )
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
                    "ccat/source_location": location.name,
                    "ccat/source_host": location.host,
                    "ccat/buffer_location": buffer.name,
                    "ccat/files": str(g.file_count),
                    "ccat/bytes": str(g.total_bytes),
                },
            )
            for g in tick.groups
        ]
        # A package whose heartbeat stopped belongs to a run that died; a run of its group
        # resumes it. The key changes whenever a run touches the package again.
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
                        "ccat/source_location": location.name,
                        "ccat/source_host": location.host,
                        "ccat/resume_package_id": str(package.package_id),
                    },
                )
            )
        if not requests:
            return dg.SensorResult(
                skip_reason=f"no new unpackaged files at {location.name!r}",
                cursor=tick.cursor.serialize(),
            )
        prepare_pool(context.instance, host_pool(location.host))
        context.log.info(
            f"{len(tick.groups)} group(s) to package and {len(stale)} stale package(s) to resume "
            f"at {location.name!r} (buffer {buffer.name!r}"
            f"{', full rescan' if tick.rescanned else ''})"
        )
        return dg.SensorResult(
            run_requests=requests,
            dynamic_partitions_requests=[partitions.build_add_request(requested)],
            cursor=tick.cursor.serialize(),
        )

    return _sensor
