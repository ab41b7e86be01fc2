"""The package state machine in the database: leases, retries, failure and completion."""

from __future__ import annotations

from ccat_packaging.claiming import PackageLimits, claim_packages
from ccat_packaging.discovery import GroupKey
from ccat_packaging.models import Status
from ccat_packaging.registration import complete, mark_failed, record_checksum
from ccat_packaging_tests.package_checks import packages_of, single_site


def test_failure_never_overwrites_completion(world) -> None:
    _, _, buf, group, key = single_site(world)
    world.file(group, "a.dat")
    with world.session() as s:
        [plan] = claim_packages(s, GroupKey.parse(key), PackageLimits(10**9, 100), "crashed-run")
        record_checksum(s, plan.package_id, 10240, "0" * 64, "sha256")
        complete(s, plan.package_id, buf)
    with world.session() as s:
        assert mark_failed(s, plan.package_id, "run-2", "late failure of a slower attempt") is False
    assert packages_of(world)[0].status == Status.COMPLETED
