"""Where a location's runs execute: on a worker at the location's site, reached through the
site's Celery queue.

The queue is a job tag, so every run of a location's job carries it, whoever launched it (a
sensor, a backfill, a re-execution, a run retry). With ``CeleryRunLauncher`` (the scaled-out
instance, docs/operations.md "Where runs execute") the run becomes a task on that queue, and a
worker subscribed to it at the site runs it; the default run launcher ignores the tag and runs
everything on the daemon's machine.

Default: one queue per site, ``ccat_<site short name>``, because one worker on the site's buffer
host can reach every instrument computer of the site and writes the archives locally, so each
byte crosses the network once. ``CCAT_RUN_QUEUES`` moves single locations elsewhere
(``location name=queue``, comma-separated), e.g. onto a worker on the instrument computer
itself.
"""

from __future__ import annotations

import re

from ccat_packaging import settings
from ccat_packaging.errors import ConfigurationError

QUEUES_ENV = "CCAT_RUN_QUEUES"
_QUEUE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def site_queue(site_short_name: str) -> str:
    """The queue of a site's workers."""
    return "ccat_" + re.sub(r"[^A-Za-z0-9_]+", "_", site_short_name.lower()).strip("_")


def queue_overrides() -> dict[str, str]:
    """``CCAT_RUN_QUEUES`` as {location name: queue}; a malformed entry is an error, not a
    silently ignored placement (``check_overrides`` catches names of no location)."""
    overrides: dict[str, str] = {}
    for entry in filter(None, (e.strip() for e in settings.run_queues().split(","))):
        location, sep, queue = (part.strip() for part in entry.partition("="))
        if not sep or not location or not _QUEUE_NAME.match(queue):
            raise ConfigurationError(
                f"{QUEUES_ENV} entry {entry!r} is not 'location name=queue' "
                "(queue names: letters, digits, '_', '.', '-')"
            )
        overrides[location] = queue
    return overrides


def check_overrides(overrides: dict[str, str], source_location_names: set[str]) -> None:
    """An override naming no SOURCE location (active or retired) is a typo: say so."""
    unknown = sorted(set(overrides) - source_location_names)
    if unknown:
        raise ConfigurationError(
            f"{QUEUES_ENV} names no SOURCE location: {', '.join(map(repr, unknown))}"
        )


def run_queue(location_name: str, site_short_name: str, overrides: dict[str, str]) -> str:
    return overrides.get(location_name) or site_queue(site_short_name)
