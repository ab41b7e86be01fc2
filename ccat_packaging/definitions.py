"""The code location: per SOURCE location a packages asset with its fixity check, the job that
materializes it and its sensor; the discovery sensor that registers their partitions; the
backlog assets; the retention job and its schedule; resources."""

from __future__ import annotations

import logging
import warnings

import dagster as dg
from sqlalchemy.exc import SQLAlchemyError

from ccat_packaging import location_cache, settings
from ccat_packaging.db import failure, make_engine, session_scope
from ccat_packaging.discovery import SourceLocationRef, sensor_name_clashes, source_locations
from ccat_packaging.errors import ConfigurationError
from ccat_packaging.jobs import build_fixity_check_of, build_package_asset, build_package_job
from ccat_packaging.maintenance import packaging_retention, packaging_retention_daily
from ccat_packaging.monitoring import backlog_definitions
from ccat_packaging.resources import AssemblyHosts, OpsDatabase
from ccat_packaging.sensors import (
    build_clash_sensor,
    build_discovery_sensor,
    build_source_location_sensor,
)

warnings.filterwarnings("ignore", category=dg.BetaWarning)
warnings.filterwarnings("ignore", category=dg.PreviewWarning)
LOG = logging.getLogger(__name__)


def load_source_locations(url: str) -> list[SourceLocationRef]:
    """Read once per code-location load; a new location needs a reload to get its sensor.
    With the database down, the locations of the last load (``location_cache``)."""
    engine = make_engine(url)
    try:
        with session_scope(engine) as session:
            locations = source_locations(session)
    except SQLAlchemyError as exc:
        cached = location_cache.load()
        problem = f"cannot read SOURCE locations from the operations database {failure(url, exc)}"
        if cached is None:
            raise ConfigurationError(problem) from exc
        LOG.warning(f"{problem}; loading the {len(cached)} locations of the last load")
        return cached
    finally:
        engine.dispose()
    location_cache.save(locations)
    return locations


@dg.definitions
def defs() -> dg.Definitions:
    locations = load_source_locations(settings.ops_db_url())
    clashes = sensor_name_clashes(locations)
    usable = [loc for loc in locations if loc.slug not in clashes]
    jobs = {location.slug: build_package_job(location) for location in usable}
    packaging = dg.Definitions(
        assets=[build_package_asset(location) for location in usable],
        asset_checks=[build_fixity_check_of(location) for location in usable],
        jobs=[*jobs.values(), packaging_retention],
        schedules=[packaging_retention_daily],
        sensors=[
            *(build_source_location_sensor(loc, jobs[loc.slug]) for loc in usable),
            *(build_clash_sensor(slug, names) for slug, names in clashes.items()),
            build_discovery_sensor(usable),
        ],
        resources={"ops_db": OpsDatabase(), "assembly_hosts": AssemblyHosts()},
    )
    return dg.Definitions.merge(packaging, backlog_definitions(usable))
