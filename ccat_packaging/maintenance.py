"""The retention job: keeps the Dagster instance small without touching the operations data.

It forgets the partitions of file groups that were completed long ago (``retention.py`` says
which) and deletes finished packaging runs past their retention period. The database keeps
every package, checksum and failure reason; a late file of a retired group brings its
partition back through the location's sensor.
"""

import shutil
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg

from ccat_packaging import settings
from ccat_packaging.names import PIPELINE, PIPELINE_TAG, partitions_name
from ccat_packaging.resources import OpsDatabase
from ccat_packaging.retention import retirable_groups

RUN_DELETE_BATCH = 500
FINISHED = [dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED]


@dg.op
def retire_file_group_partitions(context: dg.OpExecutionContext, ops_db: OpsDatabase) -> int:
    """Delete the dynamic partitions of groups completed more than
    ``CCAT_PARTITION_RETENTION_DAYS`` ago, per location partition set."""
    days = settings.partition_retention_days()
    cutoff = datetime.now(UTC) - timedelta(days=days)
    with ops_db.session() as session:
        groups = retirable_groups(session, cutoff)
    by_set: dict[str, set[str]] = defaultdict(set)
    for group in groups:
        by_set[partitions_name(group.location_slug)].add(str(group))
    retired: dict[str, int] = {}
    for name, keys in sorted(by_set.items()):
        present = keys.intersection(context.instance.get_dynamic_partitions(name))
        for key in sorted(present):
            context.instance.delete_dynamic_partition(name, key)
        if present:
            retired[name] = len(present)
    total = sum(retired.values())
    context.log.info(f"retired {total} partition(s) of groups completed more than {days} days ago")
    context.add_output_metadata(
        {"retention_days": days, "retired": total, "by_partition_set": retired}
    )
    return total


@dg.op
def delete_old_runs(context: dg.OpExecutionContext) -> int:
    """Delete finished packaging and retention runs older than ``CCAT_RUN_RETENTION_DAYS``,
    with their event logs, captured logs and stored step outputs."""
    days = settings.run_retention_days()
    if days <= 0:
        context.log.info("CCAT_RUN_RETENTION_DAYS is 0: runs are kept")
        return 0
    instance = context.instance
    runs = dg.RunsFilter(
        tags={PIPELINE_TAG: PIPELINE},
        statuses=FINISHED,
        updated_before=datetime.now(UTC) - timedelta(days=days),
    )
    deleted = 0
    while batch := instance.get_run_records(runs, limit=RUN_DELETE_BATCH):
        for record in batch:
            run_id = record.dagster_run.run_id
            instance.delete_run(run_id)
            instance.compute_log_manager.delete_logs(prefix=[run_id])
            shutil.rmtree(Path(instance.storage_directory()) / run_id, ignore_errors=True)
        deleted += len(batch)
    context.log.info(f"deleted {deleted} run(s) finished more than {days} days ago")
    context.add_output_metadata({"retention_days": days, "deleted": deleted})
    return deleted


@dg.job(
    description="Forget partitions of file groups completed long ago and delete old finished "
    "runs; the operations database is not changed.",
    tags={PIPELINE_TAG: PIPELINE},
    executor_def=dg.in_process_executor,
)
def packaging_retention() -> None:
    retire_file_group_partitions()
    delete_old_runs()


packaging_retention_daily = dg.ScheduleDefinition(
    name="packaging_retention_daily",
    job=packaging_retention,
    cron_schedule="17 4 * * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Runs the retention job once a day (CCAT_PARTITION_RETENTION_DAYS, "
    "CCAT_RUN_RETENTION_DAYS).",
)
