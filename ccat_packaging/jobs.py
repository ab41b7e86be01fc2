"""The packages asset of a SOURCE location, its ops, and the job that materializes it.

Each location has its own asset (``names.packages_asset``), partitioned by its file groups, and
its own asset job, so its partitions page lists only its groups and its assemblies share the
pool of its host. The asset is backed by a graph of typed ops: ``create_package_records`` fans
out one branch per package of the group (a resumed unfinished one, new numbered parts); each
branch assembles, checksums and registers its package; ``summarise_group`` collects the branches
into the asset's output. A run in which any branch fails, or that leaves a package of the group
failed, leaves the partition failed in the UI; the next run that leaves none materializes it.
Ops take nothing but the partition key and the database, so a sensor run, a UI or CLI backfill
and a re-execution all do the same thing. Every op is safe to run again: one that finds its
package already completed does nothing. What a failure leads to is ``failure_policy``'s
decision, applied to every op by ``op_failures``.
"""

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import dagster as dg

from ccat_packaging import (
    failure_policy,
    influx,
    names,
    op_failures,
    operations,
    run_metadata,
    settings,
)
from ccat_packaging.assembly import archive as assembly
from ccat_packaging.assembly.archive import AssembledArchive
from ccat_packaging.buffer_choice import assemble_at_first_usable_buffer, buffer_candidates
from ccat_packaging.claiming import PackageLimits, claim_packages
from ccat_packaging.discovery import GroupKey, SourceLocationRef
from ccat_packaging.fixity import build_fixity_check
from ccat_packaging.models import RawDataPackage, Status
from ccat_packaging.plans import Endpoint, PackagePlan
from ccat_packaging.registration import (
    acquire_lease,
    complete,
    heartbeat,
    lease_owner,
    record_checksum,
    stale_cutoff,
)
from ccat_packaging.resources import AssemblyHosts, OpsDatabase

if TYPE_CHECKING:
    # The type define_asset_job returns: Dagster 1.13 does not export it.
    from dagster._core.definitions.unresolved_asset_job_definition import (
        UnresolvedAssetJobDefinition,
    )


@dataclass(frozen=True)
class BuiltPackage:
    """A package after assembly; ``archive`` is None when an earlier attempt had already
    completed it (or another live run is building it)."""

    plan: PackagePlan
    archive: AssembledArchive | None


def _owner(context: dg.OpExecutionContext) -> str:
    return lease_owner(context.run_id, context.run.root_run_id)


@dg.op(out=dg.DynamicOut(PackagePlan, description="one per package to build"))
def create_package_records(
    context: dg.OpExecutionContext, ops_db: OpsDatabase
) -> Iterator[dg.DynamicOutput[PackagePlan]]:
    """Resume the group's unfinished packages and claim its unpackaged files into new parts;
    in a run an operator launched, take the group's failed packages back first."""
    key = GroupKey.parse(context.partition_key)
    redrive = failure_policy.launched_by_operator(context.run.tags)
    if redrive:
        context.log.info(f"{key}: launched by an operator; failed packages are re-driven")
    limits = PackageLimits.configured()
    with op_failures.handled(context, ops_db, None), ops_db.session() as session:
        plans = claim_packages(session, key, limits, _owner(context), redrive_failed=redrive)
    if not plans:
        context.log.info(f"{key}: every filed file is already in a package; nothing to build")
    for plan in plans:
        yield dg.DynamicOutput(
            plan, mapping_key=f"part{plan.part:03d}", metadata=run_metadata.planned(plan)
        )


@dg.op
def assemble_tar(
    context: dg.OpExecutionContext,
    plan: PackagePlan,
    ops_db: OpsDatabase,
    assembly_hosts: AssemblyHosts,
) -> BuiltPackage:
    """Write the tar on the host that holds the files, hashing it in the same pass, into the
    first buffer that can take it (``buffer_choice``)."""
    with op_failures.handled(context, ops_db, plan):
        with ops_db.session() as session:
            if not acquire_lease(session, plan.package_id, _owner(context), stale_cutoff()):
                package = session.get_one(RawDataPackage, plan.package_id)
                context.log.info(
                    f"{plan.name} was completed by an earlier attempt"
                    if package.status == Status.COMPLETED
                    else f"{plan.name} is being built by run {package.lease_owner}; leaving it"
                )
                return BuiltPackage(plan, None)
            buffers = [Endpoint.of(b) for b in buffer_candidates(session, plan.source_site_id)]
        beat = settings.stale_after_seconds() / 4
        with heartbeat(ops_db.engine, plan.package_id, beat, lambda: assembly_hosts.moved):
            archive = assemble_at_first_usable_buffer(
                assembly_hosts, plan, buffers, context.log.warning
            )
    context.add_output_metadata(
        {
            **run_metadata.where(plan, archive),
            "failover": archive.buffer.location_id != buffers[0].location_id,
            **run_metadata.size(plan, archive),
        }
    )
    return BuiltPackage(plan, archive)


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
    discard = functools.partial(assembly.discard, assembly_hosts, archive)
    with op_failures.handled(context, ops_db, plan, discard):
        assembly.verify(assembly_hosts, plan, archive)
        with ops_db.session() as session:
            record_checksum(
                session, plan.package_id, archive.size, archive.checksum, archive.algorithm
            )
    context.add_output_metadata(run_metadata.verified(plan, archive))
    return built


@dg.op
def register_at_buffer(
    context: dg.OpExecutionContext,
    built: BuiltPackage,
    ops_db: OpsDatabase,
    assembly_hosts: AssemblyHosts,
) -> str | None:
    """Publish the archive under its final name, mark the package completed, and tag the run
    with the buffer the package went to; the package's name, or None when this run built
    nothing."""
    plan, archive = built.plan, built.archive
    if archive is None:
        return None
    discard = functools.partial(assembly.discard, assembly_hosts, archive)
    with op_failures.handled(context, ops_db, plan, discard):
        published = assembly.publish(assembly_hosts, plan, archive)
        with ops_db.session() as session:
            complete(session, plan.package_id, archive.buffer.location_id)
    influx.record_completed(plan, archive, context.log.warning)
    final_path = published["path"]
    if published["adopted"]:
        context.log.info(f"{plan.name}: {final_path} already held this package's bytes; kept")
    metadata: dict[str, dg.RawMetadataValue] = {
        **run_metadata.registered(plan, archive, final_path),
        "buffer_path": dg.MetadataValue.path(final_path),
    }
    context.add_output_metadata(metadata)
    _tag_run_with_buffer(context, archive.buffer.location_name)
    return plan.name


@dg.op
def summarise_group(
    context: dg.OpExecutionContext, registered: list[str | None], ops_db: OpsDatabase
) -> None:
    """The asset's output: runs only when every branch succeeded (also with no branch at all,
    a group already packaged), and shows all the group's packages, this run's and earlier.

    A part that failed earlier, left alone by a sensor run (only an operator's run re-drives
    it), keeps the partition failed: green means no package of the group is failed."""
    key = GroupKey.parse(context.partition_key)
    with op_failures.handled(context, ops_db, None), ops_db.session() as session:
        packages = operations.list_packages(session, group=key, limit=operations.GROUP_LIMIT)
    built = [name for name in registered if name is not None]
    summary = run_metadata.group_summary(packages, built)
    failed = [p for p in packages if p.status == Status.FAILED.value]
    if failed:
        raise dg.Failure(
            description=f"{len(failed)} package(s) of {key} failed: "
            + "; ".join(f"{p.name}: {p.failure_reason}" for p in failed)
            + " (fix the cause, then backfill the group or `ccat-packaging requeue`)",
            metadata=summary,
            allow_retries=False,
        )
    context.add_output_metadata(summary)


def _tag_run_with_buffer(context: dg.OpExecutionContext, buffer: str) -> None:
    """The runs list can then be filtered by buffer; parts that went to different buffers
    (a failover between them) are all named."""
    run = context.instance.get_run_by_id(context.run_id)
    current = run.tags.get(names.BUFFER_LOCATION_TAG, "") if run else ""
    buffers = sorted({*filter(None, current.split(",")), buffer})
    context.instance.add_run_tags(context.run_id, {names.BUFFER_LOCATION_TAG: ",".join(buffers)})


def build_package_asset(location: SourceLocationRef) -> dg.AssetsDefinition:
    """The packages of one SOURCE location, one partition per file group."""
    assemble = assemble_tar.tag({names.CONCURRENCY_KEY_TAG: names.host_pool(location.host)})

    @dg.graph_asset(
        key=names.packages_asset(location.slug),
        partitions_def=_file_groups(location),
        group_name=names.PACKAGING_GROUP,
        description=(
            f"The verified tar packages of SOURCE location {location.name!r} (host "
            f"{location.host}) at their buffer, one partition per file group."
        ),
    )
    def packages() -> object:  # the handle of summarise_group's output, which Dagster types
        built = create_package_records().map(lambda p: register_at_buffer(checksum(assemble(p))))
        return summarise_group(built.collect())

    return packages


def build_fixity_check_of(location: SourceLocationRef) -> dg.AssetChecksDefinition:
    """``fixity_at_rest`` on the location's packages asset, partitioned like it."""
    return build_fixity_check(names.packages_asset(location.slug), _file_groups(location))


def _file_groups(location: SourceLocationRef) -> dg.DynamicPartitionsDefinition:
    return dg.DynamicPartitionsDefinition(name=names.partitions_name(location.slug))


def build_package_job(location: SourceLocationRef) -> "UnresolvedAssetJobDefinition":
    """The packaging job of one SOURCE location: its packages asset, without the fixity check
    (an operator runs that on its own; a packaging run has just verified what it built)."""
    return dg.define_asset_job(
        name=names.job_name(location.slug),
        selection=dg.AssetSelection.assets(names.packages_asset(location.slug)).without_checks(),
        description=(
            f"Build, verify and register the tar packages of one file group of SOURCE location "
            f"{location.name!r} (host {location.host})."
        ),
        executor_def=dg.in_process_executor,
        tags={
            names.PIPELINE_TAG: names.PIPELINE,
            names.SOURCE_LOCATION_TAG: location.name,
            names.SOURCE_HOST_TAG: location.host,
            names.CELERY_QUEUE_TAG: location.run_queue,
            # Run retry (failure_policy, path 2) starts from the first step: every op is safe
            # to run again, and Dagster 1.13's from-failure retry can skip a mapped step that
            # never started, then fail on its missing output.
            names.RETRY_STRATEGY_TAG: "ALL_STEPS",
        },
    )
