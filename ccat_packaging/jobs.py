"""The packaging job: four thin ops over the domain modules, partitioned by file group.

Ops take nothing but the partition key and the database, so a sensor run, a UI or CLI backfill
and a re-execution all do the same thing. Errors that cannot heal by waiting are raised as
``Failure(allow_retries=False)`` so the retry policy spends its attempts only on the others.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg

from ccat_packaging.assembly import archive as assembly
from ccat_packaging.assembly.archive import AssembledArchive
from ccat_packaging.claiming import PackagePlan, claim_package
from ccat_packaging.discovery import GroupKey
from ccat_packaging.errors import PackagingError
from ccat_packaging.registration import complete, mark_in_progress, record_checksum
from ccat_packaging.resources import AssemblyHosts, OpsDatabase

FILE_GROUPS = "raw_data_file_groups"
file_groups = dg.DynamicPartitionsDefinition(name=FILE_GROUPS)

PACKAGES_ASSET = dg.AssetKey("raw_data_packages")

RETRY = dg.RetryPolicy(
    max_retries=3, delay=5, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS
)


@contextmanager
def _classified_errors() -> Iterator[None]:
    """Let retryable errors reach the retry policy; fail at once on the rest."""
    try:
        yield
    except PackagingError as exc:
        if exc.retryable:
            raise
        raise dg.Failure(
            description=f"{type(exc).__name__}: {exc}",
            metadata={"error_class": type(exc).__name__},
            allow_retries=False,
        ) from exc


@dg.op(
    out=dg.Out(PackagePlan, is_required=False, description="the package to build, if any"),
    retry_policy=RETRY,
)
def create_package_record(
    context: dg.OpExecutionContext, ops_db: OpsDatabase
) -> Iterator[dg.Output[PackagePlan]]:
    """Create (or resume) the group's package and claim its unpackaged files."""
    key = GroupKey.parse(context.partition_key)
    with _classified_errors(), ops_db.session() as session:
        plan = claim_package(session, key)
    if plan is None:
        context.log.info(f"{key}: every filed file is already in a package; nothing to build")
        return
    yield dg.Output(
        plan,
        metadata={
            "package": plan.name,
            "package_id": plan.package_id,
            "files": len(plan.members),
            "bytes": plan.total_bytes,
            "source_location": plan.source.location_name,
            "source_host": plan.source.host,
            "buffer_location": plan.buffer.location_name,
        },
    )


@dg.op(retry_policy=RETRY)
def assemble_tar(
    context: dg.OpExecutionContext,
    plan: PackagePlan,
    ops_db: OpsDatabase,
    assembly_hosts: AssemblyHosts,
) -> AssembledArchive:
    """Write the tar on the host that holds the files, hashing it in the same pass."""
    with _classified_errors():
        runner = assembly_hosts.runner_for(plan.source)
        with ops_db.session() as session:
            mark_in_progress(session, plan.package_id)
        built = assembly.assemble(runner, plan)
    context.add_output_metadata(
        {
            "package": plan.name,
            "assembled_on": built.host,
            "via_ssh": built.via_ssh,
            "files": len(plan.members),
            "bytes": built.size,
            "seconds": round(built.seconds, 3),
            "throughput_MB_per_s": round(plan.total_bytes / max(built.seconds, 1e-9) / 1e6, 1),
        }
    )
    return built


@dg.op(retry_policy=RETRY)
def checksum(
    context: dg.OpExecutionContext,
    plan: PackagePlan,
    built: AssembledArchive,
    ops_db: OpsDatabase,
    assembly_hosts: AssemblyHosts,
) -> AssembledArchive:
    """Verify the archive's exact size and members, then record its checksum.

    The digest itself was computed while the archive was written; reading a package of
    hundreds of GB again would cost a full cold pass.
    """
    with _classified_errors():
        runner = assembly_hosts.runner_for(plan.source)
        try:
            assembly.verify(runner, plan, built)
        except PackagingError:
            assembly.discard(runner, built)
            raise
        with ops_db.session() as session:
            record_checksum(session, plan.package_id, built.size, built.checksum, built.algorithm)
    context.add_output_metadata(
        {
            "package": plan.name,
            "checksum": f"{built.algorithm}:{built.checksum}",
            "bytes": built.size,
            "members_verified": len(plan.members),
        }
    )
    return built


@dg.op(retry_policy=RETRY)
def register_at_buffer(
    context: dg.OpExecutionContext,
    plan: PackagePlan,
    built: AssembledArchive,
    ops_db: OpsDatabase,
    assembly_hosts: AssemblyHosts,
) -> None:
    """Publish the archive under its final name and mark the package completed."""
    with _classified_errors():
        runner = assembly_hosts.runner_for(plan.source)
        final_path = assembly.publish(runner, plan, built)
        with ops_db.session() as session:
            complete(session, plan.package_id, plan.buffer.location_id)
    metadata: dict[str, dg.RawMetadataValue] = {
        "package": plan.name,
        "status": "completed",
        "files": len(plan.members),
        "bytes": built.size,
        "checksum": f"{built.algorithm}:{built.checksum}",
        "buffer_location": plan.buffer.location_name,
        "buffer_path": dg.MetadataValue.path(final_path),
        "assembled_on": built.host,
        "via_ssh": built.via_ssh,
    }
    context.add_output_metadata(metadata)
    context.log_event(
        dg.AssetMaterialization(
            asset_key=PACKAGES_ASSET, partition=context.partition_key, metadata=metadata
        )
    )


@dg.graph
def package_raw_data() -> None:
    plan = create_package_record()
    built = checksum(plan, assemble_tar(plan))
    register_at_buffer(plan, built)


package_job = package_raw_data.to_job(
    name="package_raw_data_files",
    description="Build, verify and register the tar package of one file group.",
    partitions_def=file_groups,
    executor_def=dg.in_process_executor,
)
