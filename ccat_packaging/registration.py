"""Recording what the assembly produced: checksum, size, completion, the copy at the buffer.

A package is ``completed`` only in the same transaction that records its size, checksum and
physical copy, and only after its archive carries its final name at the buffer.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from ccat_packaging.models import (
    PhysicalCopyStatus,
    RawDataPackage,
    RawDataPackagePhysicalCopy,
    Status,
)


def mark_in_progress(session: Session, package_id: int) -> None:
    package = session.get_one(RawDataPackage, package_id)
    package.status = Status.IN_PROGRESS


def record_checksum(
    session: Session, package_id: int, size: int, checksum: str, algorithm: str
) -> None:
    package = session.get_one(RawDataPackage, package_id)
    package.size = size
    package.checksum = checksum
    package.checksum_algorithm = algorithm


def complete(session: Session, package_id: int, buffer_location_id: int) -> RawDataPackage:
    """Mark the package completed and record its physical copy at the buffer (idempotent)."""
    package = session.get_one(RawDataPackage, package_id)
    if package.size is None or package.checksum is None:
        raise ValueError(f"package {package.name} has no recorded size and checksum")
    package.status = Status.COMPLETED
    package.failure_reason = None
    copy = session.scalars(
        select(RawDataPackagePhysicalCopy).where(
            RawDataPackagePhysicalCopy.raw_data_package_id == package_id,
            RawDataPackagePhysicalCopy.data_location_id == buffer_location_id,
        )
    ).first()
    if copy is None:
        session.add(
            RawDataPackagePhysicalCopy(
                raw_data_package_id=package_id,
                data_location_id=buffer_location_id,
                status=PhysicalCopyStatus.PRESENT,
            )
        )
    else:
        copy.status = PhysicalCopyStatus.PRESENT
    return package
