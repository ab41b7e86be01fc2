"""The packaging job end to end with its SOURCE location on an SSH host, hostile names included.

The SSH settings reach the job the way a deployment sets them: ``CCAT_SSH_*`` environment
variables, read by the run's resources. Names that are not UTF-8 cannot be filed in the
operations database (``relative_path`` is text); they are covered at the runner level in
``test_ssh_assembly.py``.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from pathlib import Path

import dagster as dg
import pytest
from sqlalchemy import select

from ccat_packaging import operations
from ccat_packaging.cli import main
from ccat_packaging.models import LocationType, RawDataPackage, Status
from ccat_packaging.resources import AssemblyHosts
from ccat_packaging_tests.dagster_helpers import node, op_of, run_partition
from ccat_packaging_tests.package_checks import leftovers, packages_of
from ccat_packaging_tests.sshd import SshLab
from ccat_packaging_tests.test_ssh_assembly import (
    HOSTILE_NAMES,
    eventually,
    flip_one_bit_in_transit,
)

pytest_plugins = ["ccat_packaging_tests.ssh_fixtures"]


def _output_metadata(result: dg.ExecuteInProcessResult, op: str) -> dict[str, object]:
    [output] = [e for e in result.events_for_node(op) if e.is_successful_output]
    assert output.step_output_data is not None
    return {k: v.value for k, v in output.step_output_data.metadata.items()}


@pytest.fixture
def ssh_env(ssh_lab: SshLab, monkeypatch: pytest.MonkeyPatch) -> SshLab:
    monkeypatch.setenv("CCAT_SSH_KEY_FILE", str(ssh_lab.client_key))
    monkeypatch.setenv("CCAT_SSH_KNOWN_HOSTS", str(ssh_lab.known_hosts))
    return ssh_lab


@pytest.mark.parametrize("buffer_at", ["same ssh host", "other ssh host", "this machine"])
def test_job_packages_hostile_names_exactly_from_a_source_on_an_ssh_host(
    world, ssh_env: SshLab, tmp_path: Path, buffer_at: str
) -> None:
    lab = ssh_env
    site = world.site()
    source = world.location(
        site, "remote_src", LocationType.SOURCE, host=lab.a.address, port=lab.a.port, user="root"
    )
    if buffer_at == "this machine":
        buffer = world.location(site, "buf", LocationType.BUFFER)
    else:
        server = lab.a if buffer_at == "same ssh host" else lab.b
        buffer = world.location(
            site, "buf", LocationType.BUFFER, host=server.address, port=server.port, user="root"
        )
    group = world.group(source)
    contents = {
        name: world.file_bytes(group, name, size=500 + i) for i, name in enumerate(HOSTILE_NAMES)
    }
    key = f"remote_src__eou{group.eou_id}__mod{group.module_id}"

    with dg.instance_for_test() as instance:
        result = run_partition(instance, key)
    assert result.success

    metadata = _output_metadata(result, node("remote_src", "assemble_tar"))
    buffer_host = {"same ssh host": lab.a.address, "other ssh host": lab.b.address}
    assert metadata["source_host"] == lab.a.address
    assert metadata["buffer_host"] == buffer_host.get(buffer_at, "localhost")
    assert metadata["run_worker"] == os.uname().nodename
    assert metadata["transport"] == "ssh"
    with world.session() as s:
        [package] = s.scalars(select(RawDataPackage)).all()
    assert package.status == Status.COMPLETED
    tar_path = world.root(buffer) / package.relative_path
    data = tar_path.read_bytes()
    assert package.size == len(data)
    assert package.checksum == hashlib.sha256(data).hexdigest()
    with tarfile.open(tar_path) as tar:
        assert [m.name for m in tar] == sorted(contents, key=os.fsencode)
        for name, content in contents.items():
            member = tar.extractfile(name)
            assert member is not None and member.read() == content, name
    for place in (world.root(source), world.root(buffer), Path.home(), Path.cwd(), tmp_path):
        assert list(place.glob("PWNED*")) == [], place


def test_job_refuses_a_source_host_whose_key_is_unknown(
    world, ssh_env: SshLab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    known_hosts = tmp_path / "known_hosts_without_a"
    known_hosts.write_text(ssh_env.b.known_hosts_line + "\n")
    monkeypatch.setenv("CCAT_SSH_KNOWN_HOSTS", str(known_hosts))
    site = world.site()
    a = ssh_env.a
    source = world.location(
        site, "remote_src", LocationType.SOURCE, host=a.address, port=a.port, user="root"
    )
    world.location(site, "buf", LocationType.BUFFER)
    group = world.group(source)
    world.file_bytes(group, "frame.fits")
    key = f"remote_src__eou{group.eou_id}__mod{group.module_id}"

    with dg.instance_for_test() as instance:
        result = run_partition(instance, key)
    assert not result.success
    [failure] = result.get_step_failure_events()
    assert op_of(failure.step_key) == "assemble_tar"
    assert "HostKeyError" in str(failure.event_specific_data)
    assert "not in the known hosts file" in str(failure.event_specific_data)
    restarts = [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_RESTARTED]
    assert restarts == []  # a refused host key is not retried


def test_verify_hashes_a_package_on_its_buffer_host_over_ssh(
    world, ssh_env: SshLab, capsys
) -> None:
    lab = ssh_env
    site = world.site()
    source = world.location(site, "src", LocationType.SOURCE)
    buffer = world.location(
        site, "remote_buf", LocationType.BUFFER, host=lab.b.address, port=lab.b.port, user="root"
    )
    group = world.group(source)
    world.file_bytes(group, "frame.fits", size=100_000)
    with dg.instance_for_test() as instance:
        assert run_partition(instance, f"src__eou{group.eou_id}__mod{group.module_id}").success
    with world.session() as s:
        [copy] = operations.recorded_copies(s, s.scalars(select(RawDataPackage)).one().name)
    hosts = AssemblyHosts()  # the settings of ssh_env
    try:
        assert hosts.runner_for(copy.location).via_ssh
        check = operations.check_copy(hosts, copy)
    finally:
        hosts.close()
    assert check.ok and check.path == str(world.root(buffer) / copy.relative_path)
    assert main(["verify", copy.package]) == 0
    assert f"OK {copy.package} at remote_buf" in capsys.readouterr().out


def test_a_byte_flipped_between_source_and_buffer_host_fails_the_package(
    world, ssh_env: SshLab, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stream from one SSH host to another passes through this worker; a bit flipped on
    the way fails the package at once (retrying would not tell good bytes from bad) and the
    buffer host keeps nothing."""
    lab = ssh_env
    site = world.site()
    source = world.location(
        site, "remote_src", LocationType.SOURCE, host=lab.a.address, port=lab.a.port, user="root"
    )
    buffer = world.location(
        site, "buf", LocationType.BUFFER, host=lab.b.address, port=lab.b.port, user="root"
    )
    group = world.group(source)
    world.file_bytes(group, "frame.fits", size=200_000)
    flipped = flip_one_bit_in_transit(monkeypatch)
    with dg.instance_for_test() as instance:
        result = run_partition(instance, f"remote_src__eou{group.eou_id}__mod{group.module_id}")
    assert flipped, "nothing was streamed between the hosts"
    assert not result.success
    [package] = packages_of(world)
    assert package.status == Status.FAILED and package.retry_count == 0
    assert (package.failure_reason or "").startswith("ArchiveVerificationError")
    assert "sender's checksum" in (package.failure_reason or "")
    assert (package.size, package.checksum) == (None, None)
    assert not (world.root(buffer) / package.relative_path).exists()
    assert eventually(lambda: leftovers(world.root(buffer)) == []), leftovers(world.root(buffer))
