"""The package's state in the database: progress, heartbeat, checksum, completion, failure.

State machine: ``pending`` (files claimed) → ``in_progress`` (assembly started) → ``completed``,
or ``failed`` with a reason. A package is ``completed`` only in the same transaction that
records its size, checksum and physical copy, after its archive carries its final name at the
buffer. Failure never overwrites completion: whichever attempt completes wins.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import (
    ColumnElement,
    CursorResult,
    Engine,
    Result,
    case,
    null,
    or_,
    select,
    update,
)
from sqlalchemy.orm import Session

from ccat_packaging import settings
from ccat_packaging.db import session_scope
from ccat_packaging.models import (
    PhysicalCopyStatus,
    RawDataPackage,
    RawDataPackagePhysicalCopy,
    Status,
)


def lease_owner(run_id: str, root_run_id: str | None) -> str:
    """Who holds a package: the root run, so that Dagster's run retries and re-executions of a
    run inherit its leases instead of waiting for them to go stale."""
    return root_run_id or run_id


def stale_cutoff() -> datetime:
    """A lease whose heartbeat is older than this (``CCAT_STALE_AFTER_SECONDS``) has no live
    holder any more: its run died."""
    return datetime.now(UTC) - timedelta(seconds=settings.stale_after_seconds())


def acquire_lease(session: Session, package_id: int, owner: str, stale_before: datetime) -> bool:
    """Take the package for this run: free, already ours, or its holder's heartbeat stopped.

    False when another live run holds it (or it is completed): leave it to that run. A failed
    package is free; taking it (an operator's re-execution) starts a fresh retry budget.
    """
    was_failed = RawDataPackage.status == Status.FAILED
    result = session.execute(
        update(RawDataPackage)
        .where(
            RawDataPackage.id == package_id,
            RawDataPackage.status != Status.COMPLETED,
            or_(
                RawDataPackage.lease_owner.is_(None),
                RawDataPackage.lease_owner == owner,
                RawDataPackage.updated_at < stale_before,
            ),
        )
        .values(
            status=Status.IN_PROGRESS,
            lease_owner=owner,
            updated_at=datetime.now(UTC),
            retry_count=case((was_failed, 0), else_=RawDataPackage.retry_count),
            failure_reason=case((was_failed, null()), else_=RawDataPackage.failure_reason),
        )
    )
    return _changed(result)


def _changed(result: Result[Any]) -> bool:
    return bool(cast(CursorResult[Any], result).rowcount)


def _held_by(owner: str) -> ColumnElement[bool]:
    return or_(RawDataPackage.lease_owner.is_(None), RawDataPackage.lease_owner == owner)


def record_checksum(
    session: Session, package_id: int, size: int, checksum: str, algorithm: str
) -> None:
    package = session.get_one(RawDataPackage, package_id)
    package.size = size
    package.checksum = checksum
    package.checksum_algorithm = algorithm


def record_retry(session: Session, package_id: int, owner: str, reason: str) -> None:
    """One retryable failure: counted once, the package waits for this run's next attempt."""
    session.execute(
        update(RawDataPackage)
        .where(
            RawDataPackage.id == package_id,
            RawDataPackage.status != Status.COMPLETED,
            _held_by(owner),
        )
        .values(
            status=Status.PENDING,
            retry_count=RawDataPackage.retry_count + 1,
            failure_reason=f"retrying after: {reason}",
            updated_at=datetime.now(UTC),
        )
    )


def mark_failed(session: Session, package_id: int, owner: str, reason: str) -> bool:
    """Permanent failure with its reason, once. False when the package is completed, already
    failed, or held by another run (whose outcome decides instead)."""
    result = session.execute(
        update(RawDataPackage)
        .where(
            RawDataPackage.id == package_id,
            RawDataPackage.status.not_in([Status.COMPLETED, Status.FAILED]),
            _held_by(owner),
        )
        .values(
            status=Status.FAILED,
            failure_reason=reason,
            lease_owner=None,
            updated_at=datetime.now(UTC),
        )
    )
    return _changed(result)


def release(session: Session, package_id: int, owner: str, reason: str) -> bool:
    """Give the package up unfinished, for its next run to take at once: the step working on
    it was interrupted (run terminated, worker stopped). False if it was not ours to give."""
    result = session.execute(
        update(RawDataPackage)
        .where(
            RawDataPackage.id == package_id,
            RawDataPackage.status.not_in([Status.COMPLETED, Status.FAILED]),
            RawDataPackage.lease_owner == owner,
        )
        .values(
            status=Status.PENDING,
            lease_owner=None,
            failure_reason=f"interrupted: {reason}",
            updated_at=datetime.now(UTC),
        )
    )
    return _changed(result)


def reset_failed(
    session: Session, *conditions: ColumnElement[bool], owner: str | None
) -> list[str]:
    """Failed packages matching ``conditions`` back to ``pending`` with a fresh retry budget
    and no reason; their files stay claimed, so each is rebuilt as it was. ``owner`` leases
    them to a run that is about to build them; None leaves them to the next run of their group
    (which the location's sensor requests). Returns the names taken back."""
    result = session.execute(
        update(RawDataPackage)
        .where(RawDataPackage.status == Status.FAILED, *conditions)
        .values(
            status=Status.PENDING,
            retry_count=0,
            failure_reason=None,
            lease_owner=owner,
            updated_at=datetime.now(UTC),
        )
        .returning(RawDataPackage.name)
        .execution_options(synchronize_session=False)
    )
    return sorted(result.scalars())


def complete(session: Session, package_id: int, buffer_location_id: int) -> RawDataPackage:
    """Mark the package completed and record its physical copy at the buffer (idempotent)."""
    package = session.get_one(RawDataPackage, package_id)
    if package.size is None or package.checksum is None:
        raise ValueError(f"package {package.name} has no recorded size and checksum")
    package.status = Status.COMPLETED
    package.failure_reason = None
    package.lease_owner = None
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


@contextmanager
def heartbeat(
    engine: Engine, package_id: int, interval: float, progress: Callable[[], int]
) -> Iterator[None]:
    """Touch ``updated_at`` every ``interval`` seconds in which work on the package moved on,
    that is in which ``progress`` (a count of bytes moved) grew.

    A package whose heartbeat stopped (its process was killed, its machine rebooted, its
    assembly hung where nothing notices) is found by ``discovery.packages_needing_a_run`` and
    taken up again by the location's sensor: being alive is not enough to keep a lease.
    """
    stop = threading.Event()

    def beat() -> None:
        seen = progress()
        while not stop.wait(interval):
            moved = progress()
            if moved == seen:
                continue
            seen = moved
            try:
                with session_scope(engine) as session:
                    session.execute(
                        update(RawDataPackage)
                        .where(RawDataPackage.id == package_id)
                        .values(updated_at=datetime.now(UTC))
                    )
            except Exception:  # a missed beat only makes the package look stale sooner
                continue

    thread = threading.Thread(target=beat, name=f"heartbeat-{package_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
