"""Running the real sensors and job of the code location inside tests."""

from __future__ import annotations

import dagster as dg

from ccat_packaging.definitions import defs
from ccat_packaging.discovery import GroupKey
from ccat_packaging.names import job_name, partitions_name
from ccat_packaging.resources import OpsDatabase


def evaluate_sensor(
    name: str, instance: dg.DagsterInstance, cursor: str | None = None
) -> dg.SensorResult:
    """One tick of the named sensor, exactly as the code location defines it, on the
    operations database of ``CCAT_OPS_DB_URL``."""
    sensor = defs().resolve_sensor_def(name)
    with dg.build_sensor_context(
        instance=instance, cursor=cursor, resources={"ops_db": OpsDatabase()}
    ) as context:
        result = sensor(context)
    assert isinstance(result, dg.SensorResult)
    return result


def run_partition(
    instance: dg.DagsterInstance, key: str, tags: dict[str, str] | None = None
) -> dg.ExecuteInProcessResult:
    """The packaging job for one file group, as a backfill starts it (no tags) or, with the
    tags a sensor sets, as a sensor run."""
    slug = GroupKey.parse(key).location_slug
    instance.add_dynamic_partitions(partitions_name(slug), [key])
    job = defs().resolve_job_def(job_name(slug))
    return job.execute_in_process(
        instance=instance, partition_key=key, tags=tags, raise_on_error=False
    )
