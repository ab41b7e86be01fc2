"""A location row cannot make the worker read what the deployment does not allow."""

from __future__ import annotations

import os

import dagster as dg
import pytest

from ccat_packaging import allowed_roots
from ccat_packaging.errors import ConfigurationError
from ccat_packaging.models import LocationType, Status
from ccat_packaging.plans import Endpoint
from ccat_packaging_tests.dagster_helpers import run_partition
from ccat_packaging_tests.package_checks import assert_completed_and_intact, packages_of


def _endpoint(root: str, host: str = "localhost") -> Endpoint:
    return Endpoint(1, "src", host, None, 22, root)


def test_entries_are_host_and_absolute_root_and_malformed_ones_are_errors() -> None:
    assert allowed_roots.parse(" *=/data/ccat/ , ic1=/srv/raw/../raw2 ,") == [
        ("*", "/data/ccat"),
        ("ic1", "/srv/raw2"),
    ]
    for bad in ["/data", "ic1=relative", "=/data", "ic1=", "ic1 /data"]:
        with pytest.raises(ConfigurationError, match="CCAT_ALLOWED_ROOTS entry"):
            allowed_roots.parse(bad)


def test_a_root_is_allowed_only_at_or_under_an_allowed_root_of_its_host(monkeypatch) -> None:
    monkeypatch.setenv("CCAT_ALLOWED_ROOTS", "*=/data/ccat,IC1=/srv/raw")
    allowed_roots.check(_endpoint("/data/ccat"))
    allowed_roots.check(_endpoint("/data/ccat/primecam/"))
    allowed_roots.check(_endpoint("/srv/raw/x", host="ic1"))
    for root, host in [
        ("/data/ccatalog", "localhost"),  # a prefix of the name is not a parent
        ("/data/ccat/../../root", "localhost"),
        ("/root", "localhost"),
        ("/srv/raw/x", "ic2"),  # allowed on ic1 only
    ]:
        with pytest.raises(ConfigurationError, match="outside the roots this deployment allows"):
            allowed_roots.check(_endpoint(root, host))


def test_unset_confines_nothing(monkeypatch) -> None:
    monkeypatch.delenv("CCAT_ALLOWED_ROOTS", raising=False)
    allowed_roots.check(_endpoint("/anywhere"))


def test_a_location_row_pointing_at_the_workers_home_archives_nothing(world, monkeypatch) -> None:
    """The attack: a SOURCE row whose root is a home holding an SSH key, and a file row for
    the key. Confined, the run fails before anything is read, naming the root."""
    site = world.site()
    home = world.tmp / "home"
    key = home / ".ssh" / "id_ed25519"
    key.parent.mkdir(parents=True)
    key.write_bytes(b"-----BEGIN OPENSSH PRIVATE KEY-----\nsecret\n")
    legit = world.location(site, "legit", LocationType.SOURCE)
    evil = world.location(site, "evil", LocationType.SOURCE, root=home)
    buf = world.location(site, "buf", LocationType.BUFFER)
    evil_group = world.group(evil)
    world.file(evil_group, ".ssh/id_ed25519", key.read_bytes(), write=False)
    good_group = world.group(legit)
    world.file(good_group, "scan.fits", size=3000)
    monkeypatch.setenv("CCAT_ALLOWED_ROOTS", f"*={world.tmp / 'locations'}")
    with dg.instance_for_test() as instance:
        result = run_partition(instance, f"evil__eou{evil_group.eou_id}__mod{evil_group.module_id}")
        assert not result.success
        assert run_partition(
            instance, f"legit__eou{good_group.eou_id}__mod{good_group.module_id}"
        ).success
    failed, completed = sorted(packages_of(world), key=lambda p: p.name)
    assert failed.status == Status.FAILED
    assert (failed.failure_reason or "").startswith("ConfigurationError: location 'evil'")
    assert f"its root {str(home)!r} is outside the roots" in (failed.failure_reason or "")
    assert [p.name for p in world.root(buf).rglob("*") if "evil" in p.name] == []
    assert_completed_and_intact(world, buf, completed)
    assert os.stat(key).st_size > 0  # untouched
