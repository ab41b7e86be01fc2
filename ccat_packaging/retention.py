"""Which file groups are done for good, so the Dagster instance can forget their partitions.

Partitions pile up with every group ever packaged, and Dagster's partition pages slow down
at tens of thousands. A group is retirable when every file filed for it is in a package and
every one of its packages has been completed for longer than the retention period. Nothing
here touches the operations database: it only reads it.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import case, exists, func, select
from sqlalchemy.orm import Session

from ccat_packaging.discovery import GroupKey, location_slug
from ccat_packaging.models import (
    DataLocation,
    LocationType,
    RawDataFile,
    RawDataPackage,
    Status,
)


def retirable_groups(session: Session, completed_before: datetime) -> list[GroupKey]:
    """Groups of every SOURCE location (retired ones included) with no unpackaged file, no
    package other than completed ones, and no completion at or after ``completed_before``."""
    package = RawDataPackage
    unpackaged = (
        exists()
        .where(
            RawDataFile.source_location_id == package.source_location_id,
            RawDataFile.executed_obs_unit_id == package.executed_obs_unit_id,
            RawDataFile.instrument_module_id == package.instrument_module_id,
            RawDataFile.raw_data_package_id.is_(None),
        )
        .correlate(package)
    )
    not_completed = func.sum(case((package.status != Status.COMPLETED, 1), else_=0))
    rows = session.execute(
        select(
            DataLocation.name,
            package.executed_obs_unit_id,
            package.instrument_module_id,
        )
        .join(DataLocation, DataLocation.id == package.source_location_id)
        .where(DataLocation.location_type == LocationType.SOURCE, ~unpackaged)
        .group_by(DataLocation.name, package.executed_obs_unit_id, package.instrument_module_id)
        .having(not_completed == 0, func.max(package.updated_at) < completed_before)
        .order_by(DataLocation.name, package.executed_obs_unit_id, package.instrument_module_id)
    ).all()
    return [GroupKey(location_slug(name), eou, mod) for name, eou, mod in rows]
