"""The code location: per SOURCE location a packaging job and its sensor; the retention job
and its schedule; resources."""

from __future__ import annotations

import warnings

import dagster as dg
from sqlalchemy.exc import SQLAlchemyError

from ccat_packaging import settings
from ccat_packaging.db import failure, make_engine, session_scope
from ccat_packaging.discovery import SourceLocationRef, source_locations
from ccat_packaging.errors import ConfigurationError
from ccat_packaging.jobs import build_package_job
from ccat_packaging.maintenance import packaging_retention, packaging_retention_daily
from ccat_packaging.resources import AssemblyHosts, OpsDatabase
from ccat_packaging.sensors import build_source_location_sensor

warnings.filterwarnings("ignore", category=dg.BetaWarning)
warnings.filterwarnings("ignore", category=dg.PreviewWarning)


def load_source_locations(url: str) -> list[SourceLocationRef]:
    """Read once per code-location load; a new location needs a reload to get its sensor."""
    engine = make_engine(url)
    try:
        with session_scope(engine) as session:
            return source_locations(session)
    except SQLAlchemyError as exc:
        raise ConfigurationError(
            f"cannot read SOURCE locations from the operations database {failure(url, exc)}"
        ) from exc
    finally:
        engine.dispose()


@dg.definitions
def defs() -> dg.Definitions:
    locations = load_source_locations(settings.ops_db_url())
    jobs = {location.slug: build_package_job(location) for location in locations}
    return dg.Definitions(
        jobs=[*jobs.values(), packaging_retention],
        schedules=[packaging_retention_daily],
        sensors=[build_source_location_sensor(loc, jobs[loc.slug]) for loc in locations],
        resources={"ops_db": OpsDatabase(), "assembly_hosts": AssemblyHosts()},
    )
