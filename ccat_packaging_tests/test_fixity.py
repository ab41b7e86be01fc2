"""The ``fixity_at_rest`` check on a real instance, against packages a real run built."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from sqlalchemy import select, update

from ccat_packaging.assembly.hosts import is_same_host
from ccat_packaging.models import DiskDataLocation, LocationType, RawDataPackage
from ccat_packaging_tests.dagster_helpers import run_fixity_check, run_partition
from ccat_packaging_tests.sshd import SshLab, free_port

pytest_plugins = ["ccat_packaging_tests.ssh_fixtures"]


def _packaged(world, **buffer_at: Any) -> tuple[str, Path, RawDataPackage, int]:
    """A group of two files packaged by a real run: its key, the buffer copy, the package
    and the buffer's location id. ``buffer_at``: the buffer's host, port and user."""
    site = world.site()
    src = world.location(site, "src", LocationType.SOURCE)
    buf = world.location(site, "buf", LocationType.BUFFER, **buffer_at)
    group = world.group(src)
    world.file_bytes(group, "a.fits")
    world.file_bytes(group, "deep/b.fits")
    key = f"src__eou{group.eou_id}__mod{group.module_id}"
    with dg.instance_for_test() as instance:
        assert run_partition(instance, key).success
    with world.session() as s:
        package = s.scalars(select(RawDataPackage)).one()
    copy = world.root(buf) / package.relative_path
    copy.chmod(0o600)  # published archives may be read-only; the tests damage them
    return key, copy, package, buf


def _metadata(evaluation: dg.AssetCheckEvaluation, package: str) -> dict[str, object]:
    [value] = [v for k, v in evaluation.metadata.items() if k.startswith(f"{package} at ")]
    assert isinstance(value, dg.JsonMetadataValue) and isinstance(value.data, dict)
    return value.data


def test_an_intact_package_passes(world) -> None:
    key, copy, package, _ = _packaged(world)
    with dg.instance_for_test() as instance:
        evaluation = run_fixity_check(instance, key)
    assert evaluation.passed
    assert evaluation.description == (
        f"all 1 package copies of {key} match their recorded size and checksum"
    )
    row = _metadata(evaluation, package.name)
    assert row["path"] == str(copy)
    assert row["actual_size"] == row["expected_size"] == copy.stat().st_size
    assert row["actual_checksum"] == row["expected_checksum"] == f"sha256:{package.checksum}"
    assert row["error"] is None


def _flip_one_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    with path.open("r+b") as archive:
        archive.truncate(path.stat().st_size - 512)


@pytest.mark.parametrize(
    ("damage", "problem"),
    [(_flip_one_byte, "checksum sha256:"), (_truncate, "size ")],
    ids=["one byte flipped", "truncated"],
)
def test_a_damaged_package_fails_naming_it_and_its_path(
    world, damage: Callable[[Path], None], problem: str
) -> None:
    key, copy, package, _ = _packaged(world)
    damage(copy)
    with dg.instance_for_test() as instance:
        evaluation = run_fixity_check(instance, key)
    assert not evaluation.passed
    assert evaluation.description is not None
    assert evaluation.description.startswith(
        f"1 of 1 package copies of {key} failed: {package.name} at {copy}: {problem}"
    )
    row = _metadata(evaluation, package.name)
    assert row["expected_checksum"] == f"sha256:{package.checksum}"
    assert row["actual_checksum"] != row["expected_checksum"]
    assert str(row["error"]).startswith(problem)


def test_a_copy_on_an_ssh_host_is_hashed_there(
    world, ssh_lab: SshLab, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CCAT_SSH_KEY_FILE", str(ssh_lab.client_key))
    monkeypatch.setenv("CCAT_SSH_KNOWN_HOSTS", str(ssh_lab.known_hosts))
    server = ssh_lab.b
    assert not is_same_host(server.address)  # so the check reaches it over SSH
    key, copy, package, _ = _packaged(world, host=server.address, port=server.port, user="root")
    with dg.instance_for_test() as instance:
        assert run_fixity_check(instance, key).passed
        _flip_one_byte(copy)
        evaluation = run_fixity_check(instance, key)
    assert not evaluation.passed
    assert f"{package.name} at {copy}: checksum sha256:" in str(evaluation.description)


def test_a_missing_copy_fails_with_its_path(world) -> None:
    key, copy, package, _ = _packaged(world)
    copy.unlink()
    with dg.instance_for_test() as instance:
        evaluation = run_fixity_check(instance, key)
    assert not evaluation.passed
    assert f"{package.name} at localhost:" in str(evaluation.description)
    assert package.relative_path in str(evaluation.description)
    assert _metadata(evaluation, package.name)["actual_size"] is None


def test_an_unreachable_buffer_host_fails_promptly(
    world, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key, _, package, buf = _packaged(world)
    known_hosts = tmp_path / "known_hosts"  # none known: the host never answers
    known_hosts.touch(mode=0o600)
    monkeypatch.setenv("CCAT_SSH_KNOWN_HOSTS", str(known_hosts))
    with world.session() as s:
        s.execute(
            update(DiskDataLocation)
            .where(DiskDataLocation.id == buf)
            .values(host="127.0.0.6", port=free_port("127.0.0.6"))
        )
    started = time.monotonic()
    with dg.instance_for_test() as instance:
        evaluation = run_fixity_check(instance, key)
    assert time.monotonic() - started < 20, evaluation.description
    assert not evaluation.passed
    assert f"{package.name} at 127.0.0.6:" in str(evaluation.description)
    assert "127.0.0.6" in str(_metadata(evaluation, package.name)["error"]), evaluation.description


def test_a_group_with_no_completed_package_fails(world) -> None:
    """Nothing verified is not a pass: an operator who ran the check expected packages."""
    site = world.site()
    src = world.location(site, "src", LocationType.SOURCE)
    group = world.group(src)
    world.file(group, "a.dat")
    key = f"src__eou{group.eou_id}__mod{group.module_id}"
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("src_file_groups", [key])
        evaluation = run_fixity_check(instance, key)
    assert not evaluation.passed
    assert evaluation.description == f"{key} has no completed package to verify"
