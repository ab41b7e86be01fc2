"""What each step shows about its package in the UI (the step's output, the run's events), and
what a materialization of the location's packages asset shows about its file group.

The UI truncates long metadata, so what matters most comes first.
"""

from __future__ import annotations

import socket

import dagster as dg

from ccat_packaging.assembly.archive import AssembledArchive
from ccat_packaging.failure_policy import Verdict
from ccat_packaging.operations import PackageListing
from ccat_packaging.plans import PackagePlan

Metadata = dict[str, str | int | float | bool]


def planned(plan: PackagePlan) -> Metadata:
    """A package just claimed or resumed, before anything is built."""
    return {
        "package": plan.name,
        "package_id": plan.package_id,
        "files": len(plan.members),
        "bytes": plan.total_bytes,
        "source_location": plan.source.location_name,
        "source_host": plan.source.host,
    }


def where(plan: PackagePlan, archive: AssembledArchive) -> Metadata:
    """Which package, and the hosts and the buffer it actually went between. Hosts are named
    as the operations database names them (the archive is built on the source's host and
    written on the buffer's); ``run_worker`` is the machine whose process ran the step."""
    return {
        "package": plan.name,
        "source_location": plan.source.location_name,
        "source_host": plan.source.host,
        "transport": "ssh" if archive.via_ssh else "local",
        "buffer_location": archive.buffer.location_name,
        "buffer_host": archive.buffer.host,
        "run_worker": socket.gethostname(),
    }


def size(plan: PackagePlan, archive: AssembledArchive) -> Metadata:
    return {
        "files": len(plan.members),
        "bytes": archive.size,
        "seconds": round(archive.seconds, 3),
        "throughput_MB_per_s": round(plan.total_bytes / max(archive.seconds, 1e-9) / 1e6, 1),
    }


def verified(plan: PackagePlan, archive: AssembledArchive) -> Metadata:
    return {
        "package": plan.name,
        "checksum": f"{archive.algorithm}:{archive.checksum}",
        "bytes": archive.size,
        "members_verified": len(plan.members),
    }


def registered(plan: PackagePlan, archive: AssembledArchive, final_path: str) -> Metadata:
    return {
        "package": plan.name,
        "status": "completed",
        "checksum": f"{archive.algorithm}:{archive.checksum}",
        "buffer_path": final_path,
        **size(plan, archive),
        **where(plan, archive),
    }


def failed(plan: PackagePlan | None, verdict: Verdict) -> Metadata:
    """A step that gave up; with a plan, also which package failed and why."""
    metadata: Metadata = {
        "error_class": type(verdict.error).__name__,
        "retryable": verdict.error.retryable,
        "attempts": verdict.attempt,
    }
    if plan is None:
        return metadata
    return {"package": plan.name, "status": "failed", "reason": verdict.reason, **metadata}


def group_summary(
    packages: list[PackageListing], built: list[str]
) -> dict[str, dg.RawMetadataValue]:
    """A file group's packages as a materialization of its partition shows them: totals first,
    then one row per package (name, status, files, bytes, checksum, buffer path)."""
    rows = [
        "| package | status | files | bytes | checksum | buffer path |",
        "|---|---|---|---|---|---|",
        *(
            f"| {p.name} | {p.status} | {p.files} | {p.size if p.size is not None else '-'} "
            f"| {f'{p.algorithm}:{p.checksum}' if p.checksum else '-'} | {p.buffer_path or '-'} |"
            for p in packages
        ),
    ]
    return {
        "packages": len(packages),
        "built_by_this_run": len(built),
        "files": sum(p.files for p in packages),
        "bytes": sum(p.size or 0 for p in packages),
        "package_names": ", ".join(p.name for p in packages),
        "details": dg.MetadataValue.md("\n".join(rows)),
    }
