"""Launching packaging runs from the command line the way the UI's backfill dialog does.

The partitions are registered in the Dagster instance (``DAGSTER_HOME``), then one partition
backfill is launched through the webserver's GraphQL API (``launchPartitionBackfill`` naming
the job's partition set, which works for op and asset jobs alike). The daemon then submits a
run per group to the instance's run queue, so ``max_concurrent_runs`` and the assembly pools
apply as to any run, and since no sensor launched them they re-drive their groups' failed
packages (``failure_policy.launched_by_operator``).

Why not ``dagster job backfill`` as a subprocess: it loads the code location itself (seconds,
and the workspace file must be found), its result is text to parse, and it reports unknown
partitions only as prose; GraphQL is the webserver's public, typed interface, returns the
backfill's id and names each failure.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypedDict, cast

import dagster as dg

from ccat_packaging import names, settings
from ccat_packaging.errors import ConfigurationError, DagsterUnavailableError, PackagingError
from ccat_packaging.operations import BackfillTarget
from ccat_packaging.sensors import prepare_pool, unregistered

# The daemons that turn a backfill into started runs: the backfill daemon submits them, the
# run queue's coordinator starts them.
DAEMONS = ("BACKFILL", "QUEUED_RUN_COORDINATOR")
TIMEOUT_SECONDS = 30

VERSION = "{ version }"
LAUNCH_BACKFILL = """
mutation($p: LaunchBackfillParams!) { launchPartitionBackfill(backfillParams: $p) {
  __typename ... on LaunchBackfillSuccess { backfillId } ... on Error { message } } }"""


class _GraphQLAnswer(TypedDict, total=False):
    data: dict[str, Any]
    errors: list[dict[str, Any]]


@dataclass(frozen=True)
class LaunchedBackfill:
    backfill_id: str
    job: str
    # How many of its partitions were not registered before.
    registered: int
    url: str


@contextmanager
def dagster_instance() -> Iterator[dg.DagsterInstance]:
    """The deployment's instance (``DAGSTER_HOME``, as the daemon's), or one line saying why
    there is none."""
    home = os.environ.get("DAGSTER_HOME")
    if not home:
        raise ConfigurationError(
            "DAGSTER_HOME is not set: set it to the directory of the deployment's dagster.yaml "
            "(the daemon's)"
        )
    try:
        instance = dg.DagsterInstance.get()
    except Exception as exc:  # a broken dagster.yaml or its database: one line, not a trace
        raise ConfigurationError(
            f"the Dagster instance at DAGSTER_HOME={home} cannot be opened: "
            f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        ) from None
    with instance:
        yield instance


def ready(instance: dg.DagsterInstance, url: str) -> None:
    """Refuse to launch what no daemon would start (a backfill waits silently otherwise), and
    find out that the webserver answers before anything is registered or requeued."""
    try:
        statuses = instance.get_daemon_statuses(list(DAEMONS))
    except Exception as exc:  # the instance's own storage, not the operations database
        raise _instance_failed(exc) from None
    down = [name for name in DAEMONS if not statuses[name].healthy]
    if down:
        raise DagsterUnavailableError(
            f"no dagster-daemon is running for the instance at DAGSTER_HOME "
            f"({', '.join(down)} without a recent heartbeat): start it (make prod-daemon)"
        )
    _graphql(url, VERSION, {})


def register_partitions(instance: dg.DagsterInstance, slug: str, keys: list[str]) -> int:
    """Add the groups' partitions to the location's partition set; returns how many were new."""
    partitions = names.partitions_name(slug)
    new = unregistered(instance, partitions, keys)
    instance.add_dynamic_partitions(partitions, new)
    return len(new)


def launch(instance: dg.DagsterInstance, target: BackfillTarget, title: str) -> LaunchedBackfill:
    """Register the partitions and the host's pool, then one backfill of the target's groups
    through the webserver."""
    url = settings.dagster_url()
    slug, keys = target.slug, target.keys
    try:
        ready(instance, url)
        registered = register_partitions(instance, slug, keys)
        prepare_pool(instance, names.host_pool(target.host))
    except PackagingError:
        raise
    except Exception as exc:
        raise _instance_failed(exc) from None
    params = {
        "selector": {
            "partitionSetName": names.partition_set_name(slug),
            "repositorySelector": {
                "repositoryLocationName": names.CODE_LOCATION,
                "repositoryName": names.REPOSITORY,
            },
        },
        "partitionNames": keys,
        "title": title,
    }
    answer = _graphql(url, LAUNCH_BACKFILL, {"p": params})["launchPartitionBackfill"]
    if answer["__typename"] != "LaunchBackfillSuccess":
        message = " ".join(str(answer.get("message", "")).split())[:300]
        hint = (
            ": reload the code location (a location added since its last load has no job)"
            if answer["__typename"] == "PartitionSetNotFoundError"
            else ""
        )
        raise DagsterUnavailableError(
            f"the webserver at {url} refused the backfill: {answer['__typename']}: {message}{hint}"
        )
    backfill_id = str(answer["backfillId"])
    return LaunchedBackfill(backfill_id, names.job_name(slug), registered, url)


def _instance_failed(exc: Exception) -> DagsterUnavailableError:
    return DagsterUnavailableError(
        f"the Dagster instance at DAGSTER_HOME failed: "
        f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
    )


def _graphql(url: str, query: str, variables: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        f"{url}/graphql",
        data=json.dumps({"query": query, "variables": variables}).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS) as response:
            answer = cast(_GraphQLAnswer, json.load(response))
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        raise DagsterUnavailableError(
            f"the Dagster webserver at {url} does not answer ({reason}): start it "
            "(make prod-webserver) or set CCAT_DAGSTER_URL"
        ) from None
    if answer.get("errors") or not answer.get("data"):
        message = " ".join(str((answer.get("errors") or [{}])[0].get("message", "")).split())
        raise DagsterUnavailableError(f"the webserver at {url} answered: {message[:300]}")
    return answer["data"]
