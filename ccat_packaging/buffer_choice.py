"""Which BUFFER takes a package: the one place that decides it.

The rule: a site's active disk BUFFERs in order of preference (lowest ``priority`` number
first, ties by lowest id), and the package goes to the first of them that can take it. A buffer
that is full, refuses writes, whose free space other packages being written into it have
reserved, or whose host cannot be reached, is passed over for the next one (failover); the
assembled archive names the buffer actually used, and nothing names a buffer before that. When
no buffer can take the package only because of such reservations, the error is retryable: the
package waits for them.
No active buffer at all is a configuration error, never a reason to skip quietly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from ccat_packaging.assembly import archive
from ccat_packaging.assembly.archive import AssembledArchive
from ccat_packaging.assembly.hosts import Hosts
from ccat_packaging.errors import (
    ConfigurationError,
    HostUnreachableError,
    InsufficientSpaceError,
    LocationNotWritableError,
    NoActiveBufferError,
    SpaceReservedError,
)
from ccat_packaging.models import DataLocation, DiskDataLocation, LocationType, Site
from ccat_packaging.plans import Endpoint, PackagePlan


def buffer_candidates(session: Session, site_id: int) -> list[DiskDataLocation]:
    """The site's active BUFFERs, preferred first; raises when there is none to write to."""
    buffers = session.scalars(
        select(DataLocation)
        .where(
            DataLocation.site_id == site_id,
            DataLocation.location_type == LocationType.BUFFER,
            DataLocation.active.is_(True),
        )
        .order_by(DataLocation.priority, DataLocation.id)
    ).all()
    if not buffers:
        site = session.get_one(Site, site_id)
        raise NoActiveBufferError(
            f"site {site.short_name!r} has no active BUFFER location; add or activate one"
        )
    disk = [b for b in buffers if isinstance(b, DiskDataLocation)]
    if len(disk) != len(buffers):
        odd = ", ".join(f"{b.name} ({b.storage_type})" for b in buffers if b not in disk)
        raise ConfigurationError(f"packages are written to disk buffers only; not to {odd}")
    return disk


def primary_buffer(session: Session, site_id: int) -> DiskDataLocation:
    """The buffer a package goes to unless it is full or unreachable then."""
    return buffer_candidates(session, site_id)[0]


def assemble_at_first_usable_buffer(
    hosts: Hosts,
    plan: PackagePlan,
    buffers: Sequence[Endpoint],
    passed_over: Callable[[str], None],
) -> AssembledArchive:
    """Assemble into the first of ``buffers`` (preferred first) that can take the package.

    ``passed_over`` hears why each skipped buffer was unusable. An unreachable *source* host is
    not the buffer's fault: it is raised at once, since every buffer would fail the same way.
    """
    problems: list[str] = []
    unreachable: HostUnreachableError | None = None
    reserved = False
    unwritable = 0
    for buffer in buffers:
        try:
            return archive.assemble(hosts, plan, buffer)
        except (InsufficientSpaceError, LocationNotWritableError, SpaceReservedError) as exc:
            problems.append(f"{buffer.location_name}: {exc}")
            reserved = reserved or isinstance(exc, SpaceReservedError)
            unwritable += isinstance(exc, LocationNotWritableError)
        except HostUnreachableError as exc:
            if exc.host != buffer.host or buffer.host == plan.source.host:
                raise
            problems.append(f"{buffer.location_name}: {exc}")
            unreachable = exc
        passed_over(f"buffer {buffer.location_name} unusable: {problems[-1]}")
    summary = "; ".join(problems)
    # A buffer that is reserved or unreachable may take the package later: worth a retry.
    if reserved:
        raise SpaceReservedError(
            "no active buffer can take the package before the packages being written into it "
            f"are done: {summary}"
        )
    if unreachable is not None:
        raise HostUnreachableError(
            f"no active buffer can take the package now: {summary}", host=unreachable.host
        )
    if unwritable == len(problems):  # freeing space would not help
        raise LocationNotWritableError(f"no active buffer takes writes: {summary}")
    raise InsufficientSpaceError(f"no active buffer can take the package: {summary}")
