"""Fixity at rest: the ``fixity_at_rest`` asset check of a location's packages asset.

An operator runs it from the asset's page for one partition (file group), e.g. after a disk
incident at a buffer; it is not part of a packaging run, which has just verified what it built.
It re-hashes every present copy of each completed package of the group on the host that holds
it, with the code ``ccat-packaging verify`` uses (``operations.recorded_copies`` and
``operations.check_copy``), so the two can never disagree. Every problem (a copy missing, a
host unreachable, a size or checksum that differs) fails the check with a description naming
the package and the path; none of them hangs it: SSH connects within
``CCAT_SSH_CONNECT_TIMEOUT_SECONDS`` and a command that moves no bytes fails after
``CCAT_STALL_SECONDS``.
"""

from typing import TypedDict

import dagster as dg

from ccat_packaging import names, operations
from ccat_packaging.assembly.hosts import Hosts
from ccat_packaging.discovery import GroupKey
from ccat_packaging.models import Status
from ccat_packaging.operations import RecordedCopy
from ccat_packaging.resources import AssemblyHosts, OpsDatabase


class CopyVerdict(TypedDict):
    """One package copy as the check's metadata shows it (JSON in the UI)."""

    package: str
    buffer_location: str | None
    path: str | None
    expected_size: int | None
    actual_size: int | None
    expected_checksum: str | None
    actual_checksum: str | None
    error: str | None


def verify_group(ops_db: OpsDatabase, hosts: Hosts, key: GroupKey) -> list[CopyVerdict]:
    """One verdict per present copy of each completed package of the group, and one per
    completed package without a copy on record. The database is read first and not held open
    while packages of hundreds of GB are read."""
    verdicts: list[CopyVerdict] = []
    copies: list[RecordedCopy] = []
    with ops_db.session() as session:
        listed = operations.list_packages(
            session, Status.COMPLETED, group=key, limit=operations.GROUP_LIMIT
        )
        for package in listed:
            try:
                copies.extend(operations.recorded_copies(session, package.name))
            except Exception as exc:
                verdicts.append(_unverified(package.name, None, None, exc))
    for copy in copies:
        verdicts.append(_verdict(hosts, copy))
    return verdicts


def _verdict(hosts: Hosts, copy: RecordedCopy) -> CopyVerdict:
    expected = f"{copy.algorithm}:{copy.checksum}"
    try:
        check = operations.check_copy(hosts, copy)
    except Exception as exc:  # whatever stops the hash (no file, no host) fails this copy
        path = f"{copy.location.host}:{copy.location.root}/{copy.relative_path}"
        return _unverified(copy.package, copy, path, exc)
    actual = f"{copy.algorithm}:{check.checksum}"
    problems = [
        *([f"size {check.size}, recorded {copy.size}"] if check.size != copy.size else []),
        *([f"checksum {actual}, recorded {expected}"] if check.checksum != copy.checksum else []),
    ]
    return CopyVerdict(
        package=copy.package,
        buffer_location=copy.location.location_name,
        path=check.path,
        expected_size=copy.size,
        actual_size=check.size,
        expected_checksum=expected,
        actual_checksum=actual,
        error="; ".join(problems) or None,
    )


def _unverified(
    package: str, copy: RecordedCopy | None, path: str | None, exc: Exception
) -> CopyVerdict:
    return CopyVerdict(
        package=package,
        buffer_location=copy.location.location_name if copy else None,
        path=path,
        expected_size=copy.size if copy else None,
        actual_size=None,
        expected_checksum=f"{copy.algorithm}:{copy.checksum}" if copy else None,
        actual_checksum=None,
        error=f"{type(exc).__name__}: {exc}",
    )


def check_result(key: GroupKey, verdicts: list[CopyVerdict]) -> dg.AssetCheckResult:
    """Passed only when there is something to verify and every copy matches its record."""
    failed = [v for v in verdicts if v["error"] is not None]
    if not verdicts:
        description = f"{key} has no completed package to verify"
    elif failed:
        description = f"{len(failed)} of {len(verdicts)} package copies of {key} failed: " + (
            "; ".join(f"{v['package']} at {v['path'] or '-'}: {v['error']}" for v in failed)
        )
    else:
        description = (
            f"all {len(verdicts)} package copies of {key} match their recorded size and checksum"
        )
    metadata: dict[str, dg.RawMetadataValue] = {
        "copies": len(verdicts),
        "failed": len(failed),
        **{
            f"{v['package']} at {v['buffer_location'] or '-'}": dg.MetadataValue.json(dict(v))
            for v in verdicts
        },
    }
    return dg.AssetCheckResult(
        passed=bool(verdicts) and not failed, description=description, metadata=metadata
    )


def build_fixity_check(
    asset_key: dg.AssetKey, partitions_def: dg.PartitionsDefinition
) -> dg.AssetChecksDefinition:
    """The check on one location's packages asset, partitioned like it."""

    @dg.asset_check(
        asset=asset_key,
        name=names.FIXITY_CHECK,
        partitions_def=partitions_def,
        blocking=False,
        description=(
            "Re-hash every completed package of the file group at its buffer and compare size "
            "and checksum with the record (the same as `ccat-packaging verify`)."
        ),
    )
    def fixity_at_rest(
        context: dg.AssetCheckExecutionContext, ops_db: OpsDatabase, assembly_hosts: AssemblyHosts
    ) -> dg.AssetCheckResult:
        key = GroupKey.parse(context.partition_key)
        return check_result(key, verify_group(ops_db, assembly_hosts, key))

    return fixity_at_rest
