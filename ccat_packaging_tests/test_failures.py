"""Nothing lost, nothing doubled: crash windows, killed workers, races, a source file altered
since filing."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import dagster as dg
import pytest
from sqlalchemy import select, text, update

from ccat_packaging.claiming import PackageLimits, claim_packages
from ccat_packaging.definitions import defs
from ccat_packaging.discovery import GroupKey
from ccat_packaging.models import RawDataFile, RawDataPackage, Status
from ccat_packaging.names import job_name, partitions_name
from ccat_packaging_tests.dagster_helpers import evaluate_sensor, op_of, run_partition
from ccat_packaging_tests.deployment import (
    LOCATION,
    REPOSITORY,
    Deployment,
    running_deployment,
    wait_for,
    write_test_instance,
)
from ccat_packaging_tests.package_checks import (
    LONG_AGO,
    MB,
    assert_completed_and_intact,
    big_file,
    leftovers,
    packages_of,
    single_site,
    step_retries,
)

# --- crash windows -----------------------------------------------------------------------------


def test_rows_created_but_no_tar_resumes_the_same_package(world) -> None:
    _, _, buf, group, key = single_site(world)
    world.file(group, "a.dat")
    with world.session() as s:  # the create step committed, then its process died long ago
        claim_packages(s, GroupKey.parse(key), PackageLimits(10**9, 100), "crashed-run")
        s.execute(update(RawDataPackage).values(updated_at=LONG_AGO))
    with dg.instance_for_test() as instance:
        assert run_partition(instance, key).success
    [package] = packages_of(world)
    assert_completed_and_intact(world, buf, package)


def test_a_half_written_tar_is_cleared_and_rebuilt(world) -> None:
    _, _, buf, group, key = single_site(world)
    world.file(group, "a.dat", size=50_000)
    with world.session() as s:
        [plan] = claim_packages(s, GroupKey.parse(key), PackageLimits(10**9, 100), "crashed-run")
        s.execute(update(RawDataPackage).values(status=Status.IN_PROGRESS, updated_at=LONG_AGO))
    partial = world.root(buf) / Path(plan.relative_path).parent / f".{plan.name}.tar.partial.dead"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"x" * 1000)
    with dg.instance_for_test() as instance:
        assert run_partition(instance, key).success
    assert_completed_and_intact(world, buf, packages_of(world)[0])
    assert leftovers(world.root(buf)) == []


def test_a_tar_renamed_before_the_database_recorded_it_converges(world) -> None:
    _, _, buf, group, key = single_site(world)
    for i in range(3):
        world.file(group, f"f{i}.dat", size=20_000)
    with dg.instance_for_test() as instance:
        assert run_partition(instance, key).success
        first = packages_of(world)[0]
        # Undo the last transaction: as if the process died right after the rename.
        with world.session() as s:
            s.execute(
                update(RawDataPackage).values(status=Status.IN_PROGRESS, checksum=None, size=None)
            )
        assert run_partition(instance, key).success
    [again] = packages_of(world)
    assert (again.id, again.checksum, again.size) == (first.id, first.checksum, first.size)
    assert_completed_and_intact(world, buf, again)
    assert leftovers(world.root(buf)) == []


# --- real processes ----------------------------------------------------------------------------


def _spawn(home: Path, key: str, env_extra: dict[str, str] | None = None) -> subprocess.Popen:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "ccat_packaging_tests.run_partition_process", str(home), key],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def test_kill_9_during_assembly_is_recovered_by_the_sensor(world, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CCAT_STALE_AFTER_SECONDS", "2")
    _, _, buf, group, key = single_site(world)
    for i in range(3):
        big_file(world, group, f"big{i}.dat", 256 * MB)
    home = tmp_path / "dagster_home"
    home.mkdir()
    worker = _spawn(home, key)
    deadline = time.monotonic() + 120
    while not list(world.root(buf).rglob(".*.partial.*")):
        assert worker.poll() is None, worker.stderr.read() if worker.stderr else ""
        assert time.monotonic() < deadline, "assembly never started"
        time.sleep(0.01)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    [package] = packages_of(world)
    assert package.status == Status.IN_PROGRESS
    assert not (world.root(buf) / package.relative_path).exists()  # nothing under a final name
    time.sleep(2.5)  # the heartbeat has stopped: the package is now stale
    with dg.DagsterInstance.from_config(str(home)) as instance:
        tick = evaluate_sensor("package_src_sensor", instance)
        [request] = tick.run_requests or []
        assert request.partition_key == key and ":resume:" in str(request.run_key)
        assert run_partition(instance, key).success
    [package] = packages_of(world)
    assert_completed_and_intact(world, buf, package)
    assert leftovers(world.root(buf)) == []


def test_concurrent_runs_of_one_group_produce_one_package(world, tmp_path) -> None:
    _, _, buf, group, key = single_site(world)
    for i in range(4):
        big_file(world, group, f"f{i}.dat", 16 * MB)
    home = tmp_path / "dagster_home"
    home.mkdir()
    with dg.DagsterInstance.from_config(str(home)) as instance:
        instance.add_dynamic_partitions("src_file_groups", [key])
    workers = [_spawn(home, key) for _ in range(3)]
    for worker in workers:
        assert worker.wait(timeout=300) == 0, worker.stderr.read() if worker.stderr else ""
    [package] = packages_of(world)
    assert_completed_and_intact(world, buf, package)
    assert leftovers(world.root(buf)) == []
    with world.session() as s:
        assert {f.raw_data_package_id for f in s.scalars(select(RawDataFile))} == {package.id}


def test_database_connections_terminated_mid_run_are_survived(world, pg_admin, monkeypatch) -> None:
    """Every connection of the run is terminated while it assembles (the heartbeat's among
    them: it carries on), and then the checksum step's own, in the middle of its UPDATE: the
    step fails with the database unavailable, is retried, and the package completes."""
    monkeypatch.setenv("CCAT_RETRY_BASE_SECONDS", "0")
    monkeypatch.setenv("CCAT_STALE_AFTER_SECONDS", "1")  # heartbeat every 0.25 s
    _, _, buf, group, key = single_site(world)
    for i in range(3):
        big_file(world, group, f"f{i}.dat", 256 * MB)
    db_name = world.url.rsplit("/", 1)[1]
    killed: list[int] = []
    cut_off: list[str] = []  # statements terminated in the middle, waiting for the package's row

    def terminate(condition: str) -> None:
        with pg_admin.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid), state, query FROM pg_stat_activity "
                    f"WHERE datname = :d AND pid <> pg_backend_pid() AND {condition}"
                ),
                {"d": db_name},
            ).all()
        killed.extend(1 for ok, _, _ in rows if ok)
        cut_off.extend(str(query) for ok, state, query in rows if ok and state == "active")

    def checksum_cut_off() -> bool:
        return any("checksum" in query for query in cut_off)

    def terminate_while_the_run_works() -> None:
        deadline = time.monotonic() + 120
        while not list(world.root(buf).rglob(".*.partial.*")) and time.monotonic() < deadline:
            time.sleep(0.005)
        # Hold the package's row from now on: its next UPDATE waits, and is terminated waiting.
        with world.engine.connect() as holder, holder.begin():
            holder_pid = holder.scalar(text("SELECT pg_backend_pid()"))
            holder.execute(text("SELECT id FROM raw_data_package FOR UPDATE"))
            for _ in range(3):
                terminate(f"pid <> {holder_pid}")  # every connection of the run
                time.sleep(0.3)
            while time.monotonic() < deadline and not checksum_cut_off():
                terminate("wait_event_type = 'Lock'")
                time.sleep(0.02)

    job = defs().resolve_job_def(job_name("src"))
    thread = threading.Thread(target=terminate_while_the_run_works)
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("src_file_groups", [key])
        thread.start()
        result = job.execute_in_process(instance=instance, partition_key=key, raise_on_error=False)
        thread.join()
        messages = [r.user_message for r in instance.all_logs(result.run_id)]
    assert killed, "no connection was terminated during assembly"
    assert checksum_cut_off(), f"the checksum step was never cut off: {cut_off}"
    assert result.success
    [retry] = [
        e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_UP_FOR_RETRY
    ]
    assert op_of(retry.step_key) == "checksum"
    assert "OperationalError" in str(retry.event_specific_data)  # the driver's error...
    assert any("attempt 1 failed (DatabaseUnavailableError" in m for m in messages)  # ...judged
    [package] = packages_of(world)
    assert_completed_and_intact(world, buf, package)
    assert package.retry_count == 1  # the retry was counted, once


LAUNCH_RUN = """
mutation($p: ExecutionParams!) { launchRun(executionParams: $p) {
  __typename ... on LaunchRunSuccess { run { runId } } ... on PythonError { message } } }"""
TERMINATE_RUN = """
mutation($id: String!) { terminateRun(runId: $id) {
  __typename ... on TerminateRunSuccess { run { runId } } ... on PythonError { message } } }"""


def _launch(deployment: Deployment, key: str) -> str:
    launched = deployment.graphql(
        LAUNCH_RUN,
        p={
            "selector": {
                "repositoryLocationName": LOCATION,
                "repositoryName": REPOSITORY,
                "jobName": job_name("src"),
            },
            "executionMetadata": {"tags": [{"key": "dagster/partition", "value": key}]},
        },
    )["launchRun"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    return str(launched["run"]["runId"])


def _run_worker(instance: dg.DagsterInstance, run_id: str) -> int | None:
    """The pid of the process executing the run's steps (the in-process executor's)."""
    starts = instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_START)
    return next((e.dagster_event.pid for e in starts if e.dagster_event), None)


def test_a_run_terminated_or_its_worker_stopped_mid_assembly_leaves_nothing_behind(
    world, dagster_pg_env: dict[str, str], tmp_path: Path, monkeypatch
) -> None:
    """Terminate from the UI (GraphQL ``terminateRun``) and SIGTERM of the run worker: the
    temporary archive is removed, the package released at once (no stale lease to wait out),
    and the next run builds it."""
    _, _, buf, group, key = single_site(world)
    for i in range(4):
        big_file(world, group, f"big{i}.dat", 512 * MB)
    home = tmp_path / "dagster_home"
    write_test_instance(home)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    for name, value in dagster_pg_env.items():
        monkeypatch.setenv(name, value)
    partial = lambda: list(world.root(buf).rglob(".*.partial.*"))  # noqa: E731

    def released() -> RawDataPackage | None:
        [package] = packages_of(world)
        return package if package.lease_owner is None and not partial() else None

    with (
        running_deployment(dict(os.environ), tmp_path / "logs") as deployment,
        dg.DagsterInstance.get() as instance,
    ):
        instance.add_dynamic_partitions(partitions_name("src"), [key])
        for stop in ("terminate", "sigterm"):
            run_id = _launch(deployment, key)
            ended = functools.partial(_finished, instance, run_id)
            wait_for("the assembly to start", partial, timeout=120, every=0.01)
            if stop == "terminate":
                answer = deployment.graphql(TERMINATE_RUN, id=run_id)["terminateRun"]
                assert answer["__typename"] == "TerminateRunSuccess", answer
            else:
                worker = wait_for(
                    "its worker", functools.partial(_run_worker, instance, run_id), 10
                )
                os.kill(worker, signal.SIGTERM)
            package = wait_for(f"the package to be released ({stop})", released, timeout=60)
            assert package.status == Status.PENDING, stop
            assert (package.failure_reason or "").startswith("interrupted:"), stop
            assert not (world.root(buf) / package.relative_path).exists()
            run = wait_for("the run to end", ended, timeout=60)
            assert run.status in (dg.DagsterRunStatus.CANCELED, dg.DagsterRunStatus.FAILURE)
        last = functools.partial(_finished, instance, _launch(deployment, key))
        done = wait_for("the next run", last, timeout=180)
    assert done.status == dg.DagsterRunStatus.SUCCESS
    [package] = packages_of(world)
    assert_completed_and_intact(world, buf, package)
    assert leftovers(world.root(buf)) == []


def _finished(instance: dg.DagsterInstance, run_id: str) -> dg.DagsterRun | None:
    run = instance.get_run_by_id(run_id)
    return run if run is not None and run.is_finished else None


# --- the buffer --------------------------------------------------------------------------------


@pytest.mark.parametrize("obstacle", ["directory", "other file"])
def test_what_stands_at_the_final_path_is_never_overwritten(world, obstacle: str) -> None:
    """Not ours, so not replaced: the package fails for good naming the path, and its
    temporary archive is removed."""
    _, _, buf, group, key = single_site(world)
    world.file(group, "a.dat", size=50_000)
    with world.session() as s:
        [plan] = claim_packages(s, GroupKey.parse(key), PackageLimits(10**9, 100), "planner")
        s.execute(update(RawDataPackage).values(lease_owner=None))
    final = world.root(buf) / plan.relative_path
    if obstacle == "directory":
        (final / "keep.me").mkdir(parents=True)
    else:
        final.parent.mkdir(parents=True)
        final.write_bytes(b"someone else's bytes")
    with dg.instance_for_test() as instance:
        result = run_partition(instance, key)
    assert not result.success and step_retries(result) == 0
    [package] = packages_of(world)
    assert package.status == Status.FAILED
    assert (package.failure_reason or "").startswith("DestinationExistsError: ")
    assert f"{final} is already there" in (package.failure_reason or "")
    assert leftovers(world.root(buf)) == []  # no temporary archive
    if obstacle == "directory":
        assert (final / "keep.me").is_dir()
    else:
        assert final.read_bytes() == b"someone else's bytes"


# --- source integrity --------------------------------------------------------------------------


def test_a_source_file_altered_since_filing_fails_the_package_at_once(world) -> None:
    _, src, buf, group, key = single_site(world)
    world.file(group, "ok.dat", size=5000)
    content = world.file_bytes(group, "tampered.dat", size=5000)
    (world.root(src) / "tampered.dat").write_bytes(content[::-1])  # same size, other bytes
    with dg.instance_for_test() as instance:
        result = run_partition(instance, key)
    assert not result.success
    [package] = packages_of(world)
    assert package.status == Status.FAILED and package.retry_count == 0
    assert "altered since filing" in (package.failure_reason or "")
    assert "tampered.dat" in (package.failure_reason or "")
    assert leftovers(world.root(buf)) == []


def test_a_name_on_disk_that_is_not_its_filed_utf8_fails_as_missing_and_loses_nothing(
    world,
) -> None:
    """Names are UTF-8 text end to end: the operations database stores them as text, so a
    file whose on-disk name is other bytes (Latin-1 here) cannot be found under its row."""
    _, src, buf, group, key = single_site(world)
    content = os.urandom(4000)
    world.file(group, "obs/café.fits", content, write=False)
    latin1 = os.fsencode(world.root(src) / "obs") + b"/caf\xe9.fits"
    os.makedirs(os.path.dirname(latin1))
    with open(latin1, "wb") as handle:
        handle.write(content)
    with dg.instance_for_test() as instance:
        result = run_partition(instance, key)
        assert not result.success
        [package] = packages_of(world)
        assert package.status == Status.FAILED
        assert "source file 'obs/café.fits' is missing" in (package.failure_reason or "")
        with open(latin1, "rb") as handle:
            assert handle.read() == content  # untouched
        assert leftovers(world.root(buf)) == []
        os.rename(latin1, world.root(src) / "obs" / "café.fits")  # the fix: a UTF-8 name
        assert run_partition(instance, key).success  # an operator's run re-drives it
    [package] = packages_of(world)
    assert_completed_and_intact(world, buf, package)
