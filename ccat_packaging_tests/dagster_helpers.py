"""Running the real sensors and job of the code location inside tests."""

from __future__ import annotations

import dagster as dg

from ccat_packaging.definitions import defs
from ccat_packaging.discovery import GroupKey
from ccat_packaging.names import (
    FIXITY_CHECK,
    PARTITION_TAG,
    job_name,
    packages_asset,
    partitions_name,
)
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


def op_of(step_key: str | None) -> str:
    """The op a step ran: its key without the packages asset's node (``raw_data_packages__src.``)
    and the mapping key (``[part001]``)."""
    return str(step_key).rpartition(".")[2].split("[")[0]


def node(slug: str, op: str) -> str:
    """The handle of an op inside a location's packages asset, for ``output_for_node``."""
    return f"{packages_asset(slug).to_python_identifier()}.{op}"


def run_fixity_check(instance: dg.DagsterInstance, key: str) -> dg.AssetCheckEvaluation:
    """The ``fixity_at_rest`` check of one file group, alone in its run, as the UI's "Execute"
    of a check for one partition runs it."""
    slug = GroupKey.parse(key).location_slug
    check = dg.AssetCheckKey(packages_asset(slug), FIXITY_CHECK)
    alone = dg.define_asset_job("fixity_alone", selection=dg.AssetSelection.checks(check))
    definitions = dg.Definitions.merge(defs(), dg.Definitions(jobs=[alone]))
    # The run's partition is its tag, as the UI launches it: Dagster 1.13's execute_in_process
    # finds no partitions in a selection of checks only and refuses ``partition_key``.
    result = definitions.resolve_job_def("fixity_alone").execute_in_process(
        instance=instance, tags={PARTITION_TAG: key}, raise_on_error=False
    )
    assert result.success, "a check that fails is a check result, not a failed run"
    [evaluation] = result.get_asset_check_evaluations()
    assert evaluation.partition == key
    return evaluation
