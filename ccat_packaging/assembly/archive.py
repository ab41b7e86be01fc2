"""The assembly steps of a package, expressed as tar-agent commands on a host runner."""

from __future__ import annotations

from dataclasses import dataclass

from ccat_packaging.assembly.hosts import HostRunner
from ccat_packaging.claiming import PackagePlan


@dataclass(frozen=True)
class AssembledArchive:
    """A fsynced archive under its temporary name, with the checksum of its bytes."""

    temp_path: str
    size: int
    checksum: str
    algorithm: str
    host: str
    via_ssh: bool
    seconds: float


def assemble(runner: HostRunner, plan: PackagePlan) -> AssembledArchive:
    result = runner.run(
        "build",
        {
            "source_root": plan.source.root,
            "members": [list(m) for m in plan.members],
            "dest_root": plan.buffer.root,
            "dest_relative": plan.relative_path,
        },
    )
    return AssembledArchive(
        temp_path=result["temp_path"],
        size=int(result["size"]),
        checksum=result["checksum"],
        algorithm=result["algorithm"],
        host=runner.host,
        via_ssh=runner.via_ssh,
        seconds=float(result["seconds"]),
    )


def verify(runner: HostRunner, plan: PackagePlan, archive: AssembledArchive) -> None:
    """Size and member headers against the plan; the data is not read a second time."""
    runner.run("verify", {"path": archive.temp_path, "members": [list(m) for m in plan.members]})


def publish(runner: HostRunner, plan: PackagePlan, archive: AssembledArchive) -> str:
    result = runner.run(
        "publish",
        {
            "temp_path": archive.temp_path,
            "dest_root": plan.buffer.root,
            "dest_relative": plan.relative_path,
        },
    )
    return str(result["path"])


def discard(runner: HostRunner, archive: AssembledArchive) -> None:
    runner.run("discard", {"temp_path": archive.temp_path})
