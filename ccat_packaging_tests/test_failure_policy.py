"""The failure policy: which errors retry, how long to wait, when to give up, what is recorded
(plain Python, no Dagster run), which runs re-drive failed packages, and the policy in real runs."""

from __future__ import annotations

import threading
import time

import dagster as dg
import pytest
from sqlalchemy.exc import OperationalError

from ccat_packaging import failure_policy
from ccat_packaging.claiming import PackageLimits, claim_packages
from ccat_packaging.db import make_engine, session_scope
from ccat_packaging.discovery import GroupKey
from ccat_packaging.errors import (
    DatabaseUnavailableError,
    HostUnreachableError,
    PackagingError,
    SourceFileError,
)
from ccat_packaging.failure_policy import MAX_RETRIES, judge, launched_by_operator
from ccat_packaging.models import RawDataPackage, Status
from ccat_packaging_tests.dagster_helpers import run_partition
from ccat_packaging_tests.package_checks import (
    assert_completed_and_intact,
    leftovers,
    packages_of,
    single_site,
    step_retries,
)

# --- judging one failed attempt ----------------------------------------------------------------


def test_a_retryable_error_retries_with_doubling_jittered_waits_then_gives_up(monkeypatch) -> None:
    monkeypatch.setenv("CCAT_RETRY_BASE_SECONDS", "10")
    error = HostUnreachableError("host b: connection refused", host="b")
    for retry_number in range(MAX_RETRIES):
        verdict = judge(error, retry_number)
        assert verdict.retry and verdict.attempt == retry_number + 1
        base = 10 * 2**retry_number
        assert 0.5 * base <= verdict.wait_seconds <= 1.5 * base
        assert verdict.reason == "HostUnreachableError: host b: connection refused"
    last = judge(error, MAX_RETRIES)
    assert not last.retry and last.attempt == MAX_RETRIES + 1
    assert last.reason == (
        f"gave up after {MAX_RETRIES + 1} attempts: "
        "HostUnreachableError: host b: connection refused"
    )


def test_waits_are_spread_so_runs_that_failed_together_do_not_return_together(
    monkeypatch,
) -> None:
    monkeypatch.setenv("CCAT_RETRY_BASE_SECONDS", "10")
    waits = [failure_policy.backoff_seconds(0) for _ in range(200)]
    assert min(waits) >= 5 and max(waits) <= 15
    assert max(waits) - min(waits) > 5  # jitter, not one fixed delay


def test_a_permanent_error_fails_at_once() -> None:
    verdict = judge(SourceFileError("source file 'a.dat' is missing"), 0)
    assert not verdict.retry and verdict.attempt == 1
    assert verdict.reason == "SourceFileError: source file 'a.dat' is missing"


def test_unforeseen_errors_are_permanent_and_a_database_outage_is_retryable() -> None:
    unforeseen = judge(KeyError("x"), 0)
    assert not unforeseen.retry and type(unforeseen.error) is PackagingError
    assert unforeseen.reason == "PackagingError: unexpected KeyError: 'x'"
    outage = judge(OperationalError("SELECT 1", {}, Exception("server closed the connection")), 0)
    assert outage.retry and isinstance(outage.error, DatabaseUnavailableError)
    assert "server closed the connection" in outage.reason


# --- recording it ------------------------------------------------------------------------------


def _claimed_package(world) -> int:
    _, _, _, group, key = single_site(world)
    world.file(group, "a.dat")
    with world.session() as s:
        [plan] = claim_packages(s, GroupKey.parse(key), PackageLimits(10**9, 100), "run-1")
    return plan.package_id


def test_a_retry_is_counted_and_a_permanent_failure_recorded_with_its_reason(world) -> None:
    package_id = _claimed_package(world)
    errors: list[str] = []
    retry = judge(HostUnreachableError("b: refused", host="b"), 0)
    failure_policy.record(world.session, package_id, "run-1", retry, errors.append)
    with world.session() as s:
        package = s.get_one(RawDataPackage, package_id)
        assert (package.status, package.retry_count) == (Status.PENDING, 1)
        assert package.failure_reason == "retrying after: HostUnreachableError: b: refused"
    final = judge(HostUnreachableError("b: refused", host="b"), MAX_RETRIES)
    failure_policy.record(world.session, package_id, "run-1", final, errors.append)
    with world.session() as s:
        package = s.get_one(RawDataPackage, package_id)
        assert package.status == Status.FAILED and package.retry_count == 1
        assert package.failure_reason == final.reason
    assert errors == []


def test_another_runs_package_is_not_marked_failed_by_this_run(world) -> None:
    package_id = _claimed_package(world)  # leased to run-1
    verdict = judge(SourceFileError("gone"), 0)
    errors: list[str] = []
    failure_policy.record(world.session, package_id, "run-2", verdict, errors.append)
    with world.session() as s:
        assert s.get_one(RawDataPackage, package_id).status == Status.PENDING
    assert errors == []


def test_a_database_that_is_down_while_recording_is_logged_not_raised(world) -> None:
    package_id = _claimed_package(world)
    down = make_engine("postgresql+psycopg2://postgres@127.0.0.1:1/nowhere")
    errors: list[str] = []
    failure_policy.record(
        lambda: session_scope(down),
        package_id,
        "run-1",
        judge(SourceFileError("x"), 0),
        errors.append,
    )
    down.dispose()
    [error] = errors
    assert error.startswith("could not record the failure in the database: ")
    assert "operations database unavailable" in error


# --- which runs re-drive failed packages (path 4) ----------------------------------------------


SENSOR_RUN = {"dagster/sensor_name": "package_src_sensor", "dagster/run_key": "k"}
BACKFILL_RETRY = {
    "dagster/backfill": "b",
    "dagster/parent_run_id": "p",
    "dagster/retry_number": "1",
}


@pytest.mark.parametrize(
    ("tags", "operator"),
    [
        (SENSOR_RUN, False),
        ({**SENSOR_RUN, "dagster/parent_run_id": "p", "dagster/retry_number": "1"}, False),
        ({**SENSOR_RUN, "dagster/parent_run_id": "p"}, True),  # re-executed from the UI
        ({"dagster/backfill": "b", "dagster/partition": "k"}, True),
        (BACKFILL_RETRY, True),
        ({}, True),  # the launchpad
    ],
)
def test_operator_launched_runs_are_told_apart_from_sensor_runs(
    tags: dict[str, str], operator: bool
) -> None:
    assert launched_by_operator(tags) is operator


# --- the policy in real runs -------------------------------------------------------------------


def test_a_non_retryable_failure_marks_the_package_failed_once_with_its_reason(world) -> None:
    _, _, buf, group, key = single_site(world)
    world.file(group, "ok.dat")
    world.file(group, "gone.dat")
    (world.root(group.location_id) / "gone.dat").unlink()
    with dg.instance_for_test() as instance:
        result = run_partition(instance, key)
    assert not result.success
    [package] = packages_of(world)
    assert package.status == Status.FAILED
    assert package.retry_count == 0
    assert "SourceFileError" in (package.failure_reason or "")
    assert "gone.dat" in (package.failure_reason or "")
    assert leftovers(world.root(buf)) == []
    retries = [
        e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_UP_FOR_RETRY
    ]
    assert retries == []


def test_retryable_errors_retry_three_times_then_fail_exactly_once(world, monkeypatch) -> None:
    monkeypatch.setenv("CCAT_RETRY_BASE_SECONDS", "0")
    _, src, buf, group, key = single_site(world)
    content = world.file_bytes(group, "growing.dat", size=10_000)
    (world.root(src) / "growing.dat").write_bytes(content[:4000])  # the instrument still writes
    with dg.instance_for_test() as instance:
        result = run_partition(instance, key)
    assert not result.success
    assert step_retries(result) == 3
    [package] = packages_of(world)
    assert package.status == Status.FAILED
    assert package.retry_count == 3
    assert (package.failure_reason or "").startswith(
        "gave up after 4 attempts: SourceNotReadyError"
    )
    assert leftovers(world.root(buf)) == []


def test_a_retry_that_succeeds_completes_the_package(world, monkeypatch) -> None:
    monkeypatch.setenv("CCAT_RETRY_BASE_SECONDS", "1")
    _, src, buf, group, key = single_site(world)
    content = world.file_bytes(group, "growing.dat", size=10_000)
    path = world.root(src) / "growing.dat"
    path.write_bytes(content[:4000])

    def finish_writing_after_the_first_failure() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            packages = packages_of(world)
            if packages and packages[0].retry_count >= 1:
                path.write_bytes(content)
                return
            time.sleep(0.05)

    writer = threading.Thread(target=finish_writing_after_the_first_failure)
    writer.start()
    with dg.instance_for_test() as instance:
        result = run_partition(instance, key)
    writer.join()
    assert result.success
    assert step_retries(result) >= 1
    [package] = packages_of(world)
    assert_completed_and_intact(world, buf, package)
    assert package.retry_count == step_retries(result)
    assert package.failure_reason is None
