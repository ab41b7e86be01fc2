"""Driving the real sensors and the real job without a daemon.

Used by the embedded demo (``ccat-packaging demo``): every sensor of the code location
is ticked until it has nothing more to request, its partitions are registered, and each
requested run is executed in this process against the given Dagster instance. A run key already
used by an earlier run of the same sensor is skipped, as the daemon would.
"""

from __future__ import annotations

from dataclasses import dataclass

import dagster as dg

from ccat_packaging.names import RUN_KEY_TAG, SENSOR_NAME_TAG


@dataclass(frozen=True)
class RunOutcome:
    sensor: str
    partition_key: str
    run_id: str | None
    success: bool
    skipped_reason: str | None = None


def tick_and_run(
    definitions: dg.Definitions,
    instance: dg.DagsterInstance,
    log_level: str = "INFO",
    max_ticks: int = 1000,
) -> list[RunOutcome]:
    outcomes: list[RunOutcome] = []
    for sensor in definitions.sensors or []:
        if not sensor.has_jobs:
            continue  # file_group_discovery launches nothing; the requests below register keys
        job = definitions.resolve_job_def(sensor.job.name)
        partitions = job.partitions_def
        assert isinstance(partitions, dg.DynamicPartitionsDefinition) and partitions.name
        cursor: str | None = None
        for _ in range(max_ticks):
            with dg.build_sensor_context(
                instance=instance,
                cursor=cursor,
                sensor_name=sensor.name,
                resources=dict(definitions.resources or {}),
                definitions=definitions,
            ) as context:
                result = sensor(context)
            if not isinstance(result, dg.SensorResult) or not result.run_requests:
                break
            cursor = result.cursor
            keys = [r.partition_key for r in result.run_requests if r.partition_key]
            instance.add_dynamic_partitions(partitions.name, keys)
            for request in result.run_requests:
                outcomes.append(_launch(job, instance, sensor.name, request, log_level))
    return outcomes


def _launch(
    job: dg.JobDefinition,
    instance: dg.DagsterInstance,
    sensor: str,
    request: dg.RunRequest,
    log_level: str,
) -> RunOutcome:
    key = request.partition_key or ""
    tags = {SENSOR_NAME_TAG: sensor, RUN_KEY_TAG: request.run_key or ""}
    if request.run_key and instance.get_run_records(dg.RunsFilter(tags=tags), limit=1):
        return RunOutcome(sensor, key, None, True, skipped_reason="run key already used")
    result = job.execute_in_process(
        instance=instance,
        partition_key=key,
        tags={**request.tags, **tags},
        run_config={"loggers": {"console": {"config": {"log_level": log_level}}}},
        raise_on_error=False,
    )
    return RunOutcome(sensor, key, result.run_id, result.success)
