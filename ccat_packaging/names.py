"""Names shared by the jobs, the sensors and the retention job: Dagster names must match
``^[A-Za-z0-9_]+$``, and a run found by a tag must have been given exactly that tag."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the ccat-packaging command imports this module and must not load Dagster
    import dagster as dg

# The asset group of every location's packages asset in the UI's catalog.
PACKAGING_GROUP = "packaging"
# The asset check that re-hashes a group's packages at their buffer.
FIXITY_CHECK = "fixity_at_rest"
# Per location, the backlog recorded every few minutes (numeric metadata the UI plots).
BACKLOG_JOB = "record_backlog"
BACKLOG_SCHEDULE = "record_backlog_every_5_minutes"

# On every run of this code location (job tags are copied to runs): what run retention deletes.
PIPELINE_TAG = "ccat/pipeline"
PIPELINE = "ccat_packaging"
SOURCE_LOCATION_TAG = "ccat/source_location"
SOURCE_HOST_TAG = "ccat/source_host"
# Set on a run once its packages are at a buffer: the buffers they actually went to.
BUFFER_LOCATION_TAG = "ccat/buffer_location"
FILES_TAG = "ccat/files"
BYTES_TAG = "ccat/bytes"
RESUME_PACKAGE_TAG = "ccat/resume_package_id"

# Dagster's own tag keys. Dagster 1.13 exports none of these from its public API (only
# MAX_RUNTIME_SECONDS_TAG), so they are spelled out here, once.
SENSOR_NAME_TAG = "dagster/sensor_name"
RUN_KEY_TAG = "dagster/run_key"
PARENT_RUN_ID_TAG = "dagster/parent_run_id"
RETRY_NUMBER_TAG = "dagster/retry_number"
RETRY_STRATEGY_TAG = "dagster/retry_strategy"
BACKFILL_TAG = "dagster/backfill"
PARTITION_TAG = "dagster/partition"
CONCURRENCY_KEY_TAG = "dagster/concurrency_key"
# dagster-celery's queue tag (dagster_celery.tags; that package is an optional extra).
CELERY_QUEUE_TAG = "dagster-celery/queue"


# workspace.yaml's location name, and the repository Dagster names a code location's
# Definitions: how the GraphQL API selects our jobs.
CODE_LOCATION = "ccat_packaging"
REPOSITORY = "__repository__"

# The one sensor that registers every location's file groups as partitions, launching nothing.
DISCOVERY_SENSOR = "file_group_discovery"


def job_name(location_slug: str) -> str:
    return f"package_{location_slug}"


def packages_asset(location_slug: str) -> dg.AssetKey:
    """A location's packages, one partition per file group: each partition's status (failed,
    materialized) is its group's."""
    import dagster as dg  # here, not at import: see TYPE_CHECKING above

    return dg.AssetKey(["raw_data_packages", location_slug])


def sensor_name(location_slug: str) -> str:
    return f"package_{location_slug}_sensor"


def backlog_asset(location_slug: str) -> dg.AssetKey:
    import dagster as dg  # here, not at import: see TYPE_CHECKING above

    return dg.AssetKey(["packaging_backlog", location_slug])


def partitions_name(location_slug: str) -> str:
    return f"{location_slug}_file_groups"


def partition_set_name(location_slug: str) -> str:
    """The partition set Dagster derives from a partitioned job (op or asset job alike): what
    a partition backfill names."""
    return f"{job_name(location_slug)}_partition_set"


def host_pool(host: str) -> str:
    """The concurrency pool of a source host: ``concurrency.pools`` in dagster.yaml limits how
    many assemblies run on one host at once, for sensor runs and backfills alike."""
    return "assembly_" + re.sub(r"[^A-Za-z0-9_]+", "_", host.lower())
