"""The packaging job: thin ops over the domain modules, one run per file group.

Each SOURCE location has its own job and partition set (built by ``build_package_job``), so
its partitions page lists only its groups and its assemblies share the pool of its host. Ops
take nothing but the partition key and the database, so a sensor run, a UI or CLI backfill
and a re-execution all do the same thing. ``create_package_records`` fans out one branch per
package of the group (a resumed unfinished one, new numbered parts); each branch assembles,
checksums and registers its package. Every op is safe to run again: an op that finds its
package already completed does nothing.

Failures follow one policy (``_failure_policy``): retryable errors are retried up to
``MAX_RETRIES`` times with exponential backoff and jitter, counted once each in the package's
``retry_count``; then, and at once for any other error, the package is marked ``failed`` with
the error class and message, unless another attempt completed it meanwhile. Sensor runs leave
failed packages alone; a run an operator launched (a backfill, the launchpad, a re-execution)
re-drives them with a fresh retry budget (``launched_by_operator``).
"""

import dataclasses
import random
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import dagster as dg
from sqlalchemy.orm import Session

from ccat_packaging import settings
from ccat_packaging.assembly import archive as assembly
from ccat_packaging.assembly.archive import AssembledArchive
from ccat_packaging.assembly.hosts import Hosts
from ccat_packaging.claiming import Endpoint, PackageLimits, PackagePlan, claim_packages
from ccat_packaging.db import unavailable
from ccat_packaging.discovery import GroupKey, SourceLocationRef, buffer_candidates
from ccat_packaging.errors import (
    HostUnreachableError,
    InsufficientSpaceError,
    PackagingError,
)
from ccat_packaging.models import DataLocation, RawDataPackage, Status
from ccat_packaging.registration import (
    acquire_lease,
    complete,
    heartbeat,
    mark_failed,
    record_checksum,
    record_retry,
)
from ccat_packaging.resources import AssemblyHosts, OpsDatabase

PACKAGES_ASSET = dg.AssetKey("raw_data_packages")
# On every run of this code location (job tags are copied to runs): what run retention deletes.
PIPELINE_TAG = "ccat/pipeline"
MAX_RETRIES = 3


@dataclass(frozen=True)
class BuiltPackage:
    """A package after assembly: ``plan.buffer`` is the buffer actually written to;
    ``archive`` is None when an earlier attempt had already completed the package."""

    plan: PackagePlan
    archive: AssembledArchive | None


def _classify(exc: Exception) -> PackagingError:
    if isinstance(exc, PackagingError):
        return exc
    return unavailable(exc) or PackagingError(f"unexpected {type(exc).__name__}: {exc}")


def _backoff(retry_number: int) -> float:
    base = settings.retry_base_seconds() * 2**retry_number
    return base * random.uniform(0.5, 1.5)


@contextmanager
def _failure_policy(
    context: dg.OpExecutionContext, ops_db: OpsDatabase, plan: PackagePlan | None
) -> Iterator[None]:
    package_id = plan.package_id if plan is not None else None
    try:
        yield
    except (dg.Failure, dg.RetryRequested):
        raise
    except Exception as raw:
        exc = _classify(raw)
        attempt = context.retry_number + 1
        reason = f"{type(exc).__name__}: {exc}"
        if exc.retryable and context.retry_number < MAX_RETRIES:
            wait = _backoff(context.retry_number)
            context.log.warning(f"attempt {attempt} failed ({reason}); retrying in {wait:.1f} s")
            if package_id is not None:
                _best_effort(
                    context, ops_db, lambda s: record_retry(s, package_id, _owner(context), reason)
                )
            raise dg.RetryRequested(max_retries=MAX_RETRIES, seconds_to_wait=wait) from raw
        if exc.retryable:
            reason = f"gave up after {attempt} attempts: {reason}"
        metadata: dict[str, dg.RawMetadataValue] = {
            "error_class": type(exc).__name__,
            "retryable": exc.retryable,
            "attempts": attempt,
        }
        if plan is not None:
            metadata = {"package": plan.name, "status": "failed", "reason": reason, **metadata}
            _best_effort(
                context, ops_db, lambda s: mark_failed(s, plan.package_id, _owner(context), reason)
            )
            # The package's history (asset ``raw_data_packages``, partition = group) shows
            # the failure next to the completions.
            context.log_event(
                dg.AssetObservation(
                    asset_key=PACKAGES_ASSET, partition=context.partition_key, metadata=metadata
                )
            )
        raise dg.Failure(description=reason, metadata=metadata, allow_retries=False) from raw


def _best_effort(
    context: dg.OpExecutionContext, ops_db: OpsDatabase, write: Callable[[Session], object]
) -> None:
    """Record a failure; if the database itself is down, the stale sweep will find the package."""
    try:
        with ops_db.session() as session:
            write(session)
    except Exception as exc:
        context.log.error(f"could not record the failure in the database: {_classify(exc)}")


def _owner(context: dg.OpExecutionContext) -> str:
    """The lease owner: the root run, so run retries and re-executions inherit the lease."""
    return context.run.root_run_id or context.run_id


def _limits() -> PackageLimits:
    return PackageLimits(settings.package_max_bytes(), settings.package_max_files())


SENSOR_NAME_TAG = "dagster/sensor_name"
PARENT_RUN_ID_TAG = "dagster/parent_run_id"
RETRY_NUMBER_TAG = "dagster/retry_number"


def launched_by_operator(tags: Mapping[str, str]) -> bool:
    """Whether a run re-drives its group's failed packages.

    A run a sensor launched, and Dagster's automatic retry of one, leaves them alone: a package
    that fails for good must not be rebuilt on every late file of its group. A backfill, a
    launch from the launchpad and a re-execution are an operator's decision to try again.
    """
    if SENSOR_NAME_TAG not in tags:
        return True
    return PARENT_RUN_ID_TAG in tags and RETRY_NUMBER_TAG not in tags


@dg.op(out=dg.DynamicOut(PackagePlan, description="one per package to build"))
def create_package_records(
    context: dg.OpExecutionContext, ops_db: OpsDatabase
) -> Iterator[dg.DynamicOutput[PackagePlan]]:
    """Resume the group's unfinished packages and claim its unpackaged files into new parts;
    in a run an operator launched, take the group's failed packages back first."""
    key = GroupKey.parse(context.partition_key)
    redrive = launched_by_operator(context.run.tags)
    if redrive:
        context.log.info(f"{key}: launched by an operator; failed packages are re-driven")
    with _failure_policy(context, ops_db, None), ops_db.session() as session:
        plans = claim_packages(session, key, _limits(), _owner(context), redrive_failed=redrive)
    if not plans:
        context.log.info(f"{key}: every filed file is already in a package; nothing to build")
    for plan in plans:
        yield dg.DynamicOutput(
            plan,
            mapping_key=f"part{plan.part:03d}",
            metadata={
                "package": plan.name,
                "package_id": plan.package_id,
                "files": len(plan.members),
                "bytes": plan.total_bytes,
                "source_location": plan.source.location_name,
                "source_host": plan.source.host,
            },
        )


@dg.op
def assemble_tar(
    context: dg.OpExecutionContext,
    plan: PackagePlan,
    ops_db: OpsDatabase,
    assembly_hosts: AssemblyHosts,
) -> BuiltPackage:
    """Write the tar on the host that holds the files, hashing it in the same pass, into the
    first buffer (by priority) that can take it."""
    with _failure_policy(context, ops_db, plan):
        stale_before = datetime.now(UTC) - timedelta(seconds=settings.stale_after_seconds())
        with ops_db.session() as session:
            if not acquire_lease(session, plan.package_id, _owner(context), stale_before):
                package = session.get_one(RawDataPackage, plan.package_id)
                context.log.info(
                    f"{plan.name} was completed by an earlier attempt"
                    if package.status == Status.COMPLETED
                    else f"{plan.name} is being built by run {package.lease_owner}; leaving it"
                )
                return BuiltPackage(plan, None)
            site_id = session.get_one(DataLocation, plan.source.location_id).site_id
            buffers = [Endpoint.of(b) for b in buffer_candidates(session, site_id)]
        with heartbeat(ops_db.engine, plan.package_id, settings.stale_after_seconds() / 4):
            built = _assemble_into_first_usable(context, assembly_hosts, plan, buffers)
    assert built.archive is not None
    context.add_output_metadata(
        {
            **_where(built.plan, built.archive),
            "failover": built.plan.buffer.location_id != buffers[0].location_id,
            **_size(built.plan, built.archive),
        }
    )
    return built


def _where(plan: PackagePlan, archive: AssembledArchive) -> "dict[str, dg.RawMetadataValue]":
    """Which package, and the hosts it went between: shown on each step and in its history."""
    return {
        "package": plan.name,
        "source_location": plan.source.location_name,
        "source_host": plan.source.host,
        "assembled_on": archive.host,
        "transport": "ssh" if archive.via_ssh else "local",
        "buffer_location": plan.buffer.location_name,
    }


def _size(plan: PackagePlan, archive: AssembledArchive) -> "dict[str, dg.RawMetadataValue]":
    return {
        "files": len(plan.members),
        "bytes": archive.size,
        "seconds": round(archive.seconds, 3),
        "throughput_MB_per_s": round(plan.total_bytes / max(archive.seconds, 1e-9) / 1e6, 1),
    }


def _assemble_into_first_usable(
    context: dg.OpExecutionContext,
    hosts: Hosts,
    plan: PackagePlan,
    buffers: list[Endpoint],
) -> BuiltPackage:
    """Failover: a buffer that is full or unreachable is skipped for the next one."""
    problems: list[str] = []
    for buffer in buffers:
        candidate = dataclasses.replace(plan, buffer=buffer)
        try:
            return BuiltPackage(candidate, assembly.assemble(hosts, candidate))
        except InsufficientSpaceError as exc:
            problems.append(f"{buffer.location_name}: {exc}")
        except HostUnreachableError as exc:
            if exc.host != buffer.host or buffer.host == plan.source.host:
                raise
            problems.append(f"{buffer.location_name}: {exc}")
        context.log.warning(f"buffer {buffer.location_name} unusable: {problems[-1]}")
    raise InsufficientSpaceError("no active buffer can take the package: " + "; ".join(problems))


@dg.op
def checksum(
    context: dg.OpExecutionContext,
    built: BuiltPackage,
    ops_db: OpsDatabase,
    assembly_hosts: AssemblyHosts,
) -> BuiltPackage:
    """Verify the archive's exact size and members, then record its checksum.

    The digest itself was computed while the archive was written; reading a package of
    hundreds of GB again would cost a full cold pass.
    """
    plan, archive = built.plan, built.archive
    if archive is None:
        return built
    with _failure_policy(context, ops_db, plan):
        try:
            assembly.verify(assembly_hosts, plan, archive)
        except PackagingError:
            assembly.discard(assembly_hosts, archive)
            raise
        with ops_db.session() as session:
            record_checksum(
                session, plan.package_id, archive.size, archive.checksum, archive.algorithm
            )
    context.add_output_metadata(
        {
            "package": plan.name,
            "checksum": f"{archive.algorithm}:{archive.checksum}",
            "bytes": archive.size,
            "members_verified": len(plan.members),
        }
    )
    return built


@dg.op
def register_at_buffer(
    context: dg.OpExecutionContext,
    built: BuiltPackage,
    ops_db: OpsDatabase,
    assembly_hosts: AssemblyHosts,
) -> None:
    """Publish the archive under its final name and mark the package completed."""
    plan, archive = built.plan, built.archive
    if archive is None:
        return
    with _failure_policy(context, ops_db, plan):
        final_path = assembly.publish(assembly_hosts, plan, archive)
        with ops_db.session() as session:
            complete(session, plan.package_id, plan.buffer.location_id)
    metadata: dict[str, dg.RawMetadataValue] = {  # what matters most first: the UI truncates
        "package": plan.name,
        "status": "completed",
        "checksum": f"{archive.algorithm}:{archive.checksum}",
        "buffer_path": dg.MetadataValue.path(final_path),
        **_size(plan, archive),
        **_where(plan, archive),
    }
    context.add_output_metadata(metadata)
    context.log_event(
        dg.AssetMaterialization(
            asset_key=PACKAGES_ASSET, partition=context.partition_key, metadata=metadata
        )
    )


def job_name(location_slug: str) -> str:
    return f"package_{location_slug}"


def partitions_name(location_slug: str) -> str:
    return f"{location_slug}_file_groups"


def host_pool(host: str) -> str:
    """The concurrency pool of a source host: ``concurrency.pools`` in dagster.yaml limits how
    many assemblies run on one host at once, for sensor runs and backfills alike."""
    return "assembly_" + re.sub(r"[^A-Za-z0-9_]+", "_", host.lower())


def build_package_job(location: SourceLocationRef) -> dg.JobDefinition:
    """The packaging job of one SOURCE location, partitioned by its file groups."""
    assemble = assemble_tar.tag({"dagster/concurrency_key": host_pool(location.host)})

    @dg.graph(name=job_name(location.slug))
    def package_location() -> None:
        create_package_records().map(lambda plan: register_at_buffer(checksum(assemble(plan))))

    return package_location.to_job(
        description=(
            f"Build, verify and register the tar packages of one file group of SOURCE location "
            f"{location.name!r} (host {location.host})."
        ),
        partitions_def=dg.DynamicPartitionsDefinition(name=partitions_name(location.slug)),
        executor_def=dg.in_process_executor,
        tags={
            PIPELINE_TAG: "ccat_packaging",
            "ccat/source_location": location.name,
            "ccat/source_host": location.host,
            # A crashed run worker's run is retried from the start: every op is safe to run
            # again, and Dagster 1.13's from-failure retry can skip a mapped step that never
            # started, then fail on its missing output.
            "dagster/retry_strategy": "ALL_STEPS",
        },
    )
