"""The backlog over time: per SOURCE location an asset ``packaging_backlog/<slug>`` whose
materializations carry numbers (the UI draws each one over time: the asset's Overview,
Metadata, Plots), and the same numbers in InfluxDB when it is configured (``influx``).

One job, ``record_backlog``, records every location every five minutes
(``record_backlog_every_5_minutes``): unpackaged files and bytes, the oldest one's age,
packages completed and failed in the last hour, failed packages now, and the free space of each
active buffer of the location's site. What cannot be measured (a buffer host that does not
answer within ``FREE_SPACE_BOUND_SECONDS``) is left out of that location's numbers, said in its
``problems`` metadata and warned about; the other buffers and locations are still recorded.
The numbers themselves come from ``operations.backlog`` and ``operations.buffer_space``.
"""

from collections.abc import Iterator

import dagster as dg

from ccat_packaging import influx, names, operations
from ccat_packaging.discovery import SourceLocationRef
from ccat_packaging.operations import BufferSpace, LocationBacklog
from ccat_packaging.resources import HostReach, OpsDatabase

# A free-space probe (log in, one statvfs) that takes longer than this is given up: the
# record is due again in five minutes, and a stall period would hold up every location.
FREE_SPACE_BOUND_SECONDS = 20


def backlog_metadata(
    row: LocationBacklog, spaces: list[BufferSpace]
) -> dict[str, dg.MetadataValue]:
    """Numbers as ``int``/``float`` metadata (what the UI's Metadata plots draw), free space per
    buffer as ``buffer_free_bytes[<buffer>]``, and ``problems``: what could not be measured."""
    metadata: dict[str, dg.MetadataValue] = {
        key: dg.MetadataValue.int(value)
        if isinstance(value, int)
        else dg.MetadataValue.float(value)
        for key, value in row.metrics().items()
    }
    for space in spaces:
        if space.free is not None:
            metadata[f"buffer_free_bytes[{space.location}]"] = dg.MetadataValue.int(space.free)
    problems = [f"{s.shown}: {s.problem}" for s in spaces if s.problem]
    metadata["problems"] = dg.MetadataValue.text("; ".join(problems) or "none")
    return metadata


def backlog_definitions(locations: list[SourceLocationRef]) -> dg.Definitions:
    """The backlog assets of these locations, the job that records them and its schedule
    (nothing without locations)."""
    if not locations:
        return dg.Definitions()
    by_key = {names.backlog_asset(loc.slug): loc for loc in locations}

    @dg.multi_asset(
        name="packaging_backlog",
        specs=[
            dg.AssetSpec(
                key,
                description=f"Backlog of SOURCE location {loc.name!r}: files waiting to be "
                "packaged, the oldest one's age, recent completions and failures, and the "
                "free space of its site's buffers. Over time: Metadata, Plots (below).",
                group_name="monitoring",
                skippable=True,  # a location retired since the code location loaded
            )
            for key, loc in by_key.items()
        ],
    )
    def packaging_backlog(
        context: dg.AssetExecutionContext, ops_db: OpsDatabase
    ) -> Iterator[dg.MaterializeResult]:
        reach = HostReach(FREE_SPACE_BOUND_SECONDS)
        try:
            with ops_db.session() as session:
                rows = operations.backlog(session)
                sites = {row.site_id for row in rows}
                spaces = {site: operations.buffer_space(session, reach, site) for site in sites}
        finally:
            reach.close()
        points: list[influx.Point | None] = []
        for site_spaces in spaces.values():
            for space in site_spaces:
                if space.problem:
                    context.log.warning(f"free space of {space.shown} not known: {space.problem}")
                points.append(influx.buffer_point(space))
        recorded = set()
        for row in rows:
            key = names.backlog_asset(row.slug)
            if key not in by_key:
                continue  # a location added since the code location loaded: reload it
            recorded.add(key)
            points.append(influx.backlog_point(row))
            yield dg.MaterializeResult(
                asset_key=key, metadata=backlog_metadata(row, spaces[row.site_id])
            )
        for key in sorted(set(by_key) - recorded, key=str):
            context.log.warning(
                f"{by_key[key].name}: no longer an active SOURCE location; its backlog is not "
                "recorded (reload the code location to drop its asset)"
            )
        influx.write(points, context.log.warning)

    job = dg.define_asset_job(
        names.BACKLOG_JOB,
        selection=dg.AssetSelection.assets(packaging_backlog),
        description="Record every SOURCE location's backlog and its site's buffer free space "
        "(asset metadata, and InfluxDB when CCAT_INFLUXDB_URL is set).",
        tags={names.PIPELINE_TAG: names.PIPELINE},
        executor_def=dg.in_process_executor,
    )
    schedule = dg.ScheduleDefinition(
        name=names.BACKLOG_SCHEDULE,
        job=job,
        cron_schedule="*/5 * * * *",
        execution_timezone="UTC",
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description="Records the backlog every five minutes.",
    )
    return dg.Definitions(assets=[packaging_backlog], jobs=[job], schedules=[schedule])
