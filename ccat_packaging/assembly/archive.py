"""The assembly steps of a package, expressed as tar-agent commands on host runners.

The archive is always written by the agent on the host that holds the source files. When the
buffer is on that host too (or both are this machine) it writes straight into the buffer's
directory; otherwise it streams the archive (``send``) through this worker to the agent on the
buffer's host (``receive``), which checks size and checksum before anything counts. Either
way the bytes are the same. Verifying, publishing and discarding run where the buffer is.

Every step takes ``hosts``: the ``AssemblyHosts`` resource, or any runner obtained from it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from ccat_packaging import settings
from ccat_packaging.assembly import tar_agent
from ccat_packaging.assembly.hosts import AgentProcess, HostRunner, Hosts, agent_error, describe
from ccat_packaging.errors import (
    ArchiveVerificationError,
    InsufficientSpaceError,
    PackagingError,
    SpaceReservedError,
    StalledError,
)
from ccat_packaging.plans import Endpoint, PackagePlan

PUMP_BLOCK = 1 << 20


@dataclass(frozen=True)
class AssembledArchive:
    """A fsynced archive under its temporary name at the buffer, with its checksum.

    ``identity`` is the file that was hashed (inode, size, times): verify and publish act on
    ``temp_path`` only while it is still that file. ``via_ssh`` says how the source's host was
    reached; ``buffer`` is the location whose host holds ``temp_path``.
    """

    temp_path: str
    identity: tar_agent.FileIdentity
    size: int
    checksum: str
    algorithm: str
    via_ssh: bool
    seconds: float
    buffer: Endpoint


def assemble(hosts: Hosts, plan: PackagePlan, buffer: Endpoint) -> AssembledArchive:
    """The package's archive under its temporary name at ``buffer``, fsynced and checksummed.

    A stall is reported with the file the archive had reached, which is what an operator
    looks at first (a file on a mount that stopped answering)."""
    members = _checked_members(plan)
    try:
        return _assemble(hosts, plan, buffer, members)
    except StalledError as exc:
        raise exc.reaching(tar_agent.position(list(plan.members), exc.moved)) from None


def _assemble(
    hosts: Hosts, plan: PackagePlan, buffer: Endpoint, members: list[list[Any]]
) -> AssembledArchive:
    source = hosts.runner_for(plan.source)
    receiver = hosts.runner_for(buffer)
    if source.machine == receiver.machine:
        try:
            spec = tar_agent.BuildSpec(
                source_root=plan.source.root,
                members=members,
                dest_root=buffer.root,
                dest_relative=plan.relative_path,
                checksums=plan.checksum_spec(),
            )
            result = source.run("build", spec)
        except (InsufficientSpaceError, SpaceReservedError) as exc:  # name the buffer too
            raise type(exc)(f"{exc} (buffer {describe(buffer)})") from None
    else:
        result = _stream(source, receiver, buffer, plan, members)
    return AssembledArchive(
        temp_path=result["temp_path"],
        identity=result["identity"],
        size=int(result["size"]),
        checksum=result["checksum"],
        algorithm=result["algorithm"],
        via_ssh=source.via_ssh,
        seconds=float(result["seconds"]),
        buffer=buffer,
    )


def _checked_members(plan: PackagePlan) -> list[list[Any]]:
    """Refuse unsafe paths here, before any host is contacted (the agent checks them again,
    together with symlinks, which only the host can see)."""
    try:
        tar_agent.check_relative_path(plan.relative_path)
        return [[tar_agent.check_relative_path(path), size] for path, size in plan.members]
    except tar_agent.AgentError as exc:
        raise agent_error(exc.kind, exc.message, describe(plan.source)) from None


def _stream(
    source: HostRunner,
    destination: HostRunner,
    buffer: Endpoint,
    plan: PackagePlan,
    members: list[list[Any]],
) -> dict[str, Any]:
    """Build on the source's host, write on the buffer's host, the bytes passing through here.

    The receiver gets the sender's checksum only after the last byte, and keeps the archive
    only if what it wrote has that checksum and the predicted size.
    """
    started = time.monotonic()
    need = tar_agent.predicted_size([(path, size) for path, size in members])
    receiver = destination.start(
        "receive",
        tar_agent.ReceiveSpec(dest_root=buffer.root, dest_relative=plan.relative_path, size=need),
    )
    try:
        sender = source.start(
            "send",
            tar_agent.SendSpec(
                source_root=plan.source.root, members=members, checksums=plan.checksum_spec()
            ),
        )
    except BaseException:
        receiver.abort()
        raise
    try:
        _pump(sender, receiver, need)
        sent = sender.wait()
        receiver.write(f"{sent['checksum']}\n".encode("ascii"))
        receiver.close_input()
        received = receiver.wait()
    except BaseException:
        sender.abort()
        receiver.abort()
        raise
    if received["checksum"] != sent["checksum"] or received["size"] != sent["size"]:
        unkept = tar_agent.DiscardSpec(
            temp_path=received["temp_path"], identity=received["identity"], dest_root=buffer.root
        )
        destination.run("discard", unkept)
        raise ArchiveVerificationError(  # the receiver checks this too; a second look is cheap
            f"{describe(buffer)}: received {received['size']} bytes with checksum "
            f"{received['checksum']}, sent {sent['size']} with {sent['checksum']}"
        )
    return {**received, "seconds": time.monotonic() - started}


def _pump(sender: AgentProcess, receiver: AgentProcess, need: int) -> None:
    """Copy exactly ``need`` bytes; a side that stops early explains why through ``wait``."""
    left = need
    while left:
        block = sender.read(min(left, PUMP_BLOCK))
        if not block:
            sender.wait()  # raises the sender's own error
            raise ArchiveVerificationError(
                f"the sender stopped after {need - left} of {need} bytes without an error"
            )
        try:
            receiver.write(block)
        except StalledError:
            raise  # the receiver stopped taking bytes: it has nothing more to say
        except PackagingError:
            receiver.wait()  # the receiver's own error (no space, ...) says more than a pipe
            raise
        left -= len(block)


def verify(hosts: Hosts, plan: PackagePlan, archive: AssembledArchive) -> None:
    """Size and member headers against the plan; the data is not read a second time."""
    spec = tar_agent.VerifySpec(
        path=archive.temp_path, identity=archive.identity, members=[list(m) for m in plan.members]
    )
    hosts.runner_for(archive.buffer).run("verify", spec)


def publish(hosts: Hosts, plan: PackagePlan, archive: AssembledArchive) -> tar_agent.PublishResult:
    """The archive under its final name, with the permission bits of ``CCAT_ARCHIVE_MODE``:
    ``adopted`` when an earlier attempt had put it there (the agent never replaces a file that
    is not this package)."""
    spec = tar_agent.PublishSpec(
        temp_path=archive.temp_path,
        identity=archive.identity,
        mode=settings.archive_mode(),
        dest_root=archive.buffer.root,
        dest_relative=plan.relative_path,
        size=archive.size,
        checksum=archive.checksum,
    )
    result = hosts.runner_for(archive.buffer).run("publish", spec)
    return tar_agent.PublishResult(path=str(result["path"]), adopted=bool(result["adopted"]))


def discard(hosts: Hosts, archive: AssembledArchive) -> None:
    hosts.runner_for(archive.buffer).run(
        "discard",
        tar_agent.DiscardSpec(
            temp_path=archive.temp_path, identity=archive.identity, dest_root=archive.buffer.root
        ),
    )
