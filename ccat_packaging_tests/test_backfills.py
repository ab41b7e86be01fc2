"""An operator packages groups while the location's sensor is stopped: ``file_group_discovery``
registers a new group's partition on its own, and ``ccat-packaging backfill`` and ``requeue
--launch`` launch runs through the webserver and the run queue of a real daemon and
webserver, which re-drive failed packages. One deployment serves every test here."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest
from sqlalchemy import Engine, select, update

from ccat_packaging.backfills import DAEMONS
from ccat_packaging.claiming import PackageLimits, claim_packages
from ccat_packaging.cli import main
from ccat_packaging.discovery import GroupKey
from ccat_packaging.models import LocationType, RawDataPackage, Status
from ccat_packaging.names import (
    BACKFILL_TAG,
    PARTITION_TAG,
    SENSOR_NAME_TAG,
    job_name,
    partitions_name,
)
from ccat_packaging_tests.conftest import scratch_dagster_db, scratch_ops_db
from ccat_packaging_tests.deployment import (
    Deployment,
    free_port,
    running_deployment,
    wait_for,
    write_test_instance,
)
from ccat_packaging_tests.world import Group, World

CLI = Path(sys.executable).parent / "ccat-packaging"


@dataclass
class Deployed:
    world: World
    deployment: Deployment
    src: int


@pytest.fixture(scope="module")
def deployed(pg_admin: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployed]:
    """A site with SOURCE ``src`` (its sensor stopped, as by default) and a buffer; daemon and
    webserver on a PostgreSQL instance; this process's environment pointing at both, as an
    operator's shell would."""
    tmp = tmp_path_factory.mktemp("backfills")
    home = tmp / "dagster_home"
    write_test_instance(home)
    port = free_port()
    with (
        scratch_ops_db(pg_admin) as url,
        scratch_dagster_db(pg_admin) as dagster_env,
        pytest.MonkeyPatch.context() as env,
    ):
        for name, value in {
            **dagster_env,
            "CCAT_OPS_DB_URL": url,
            "DAGSTER_HOME": str(home),
            "CCAT_SENSOR_INTERVAL_SECONDS": "1",
            "CCAT_DAGSTER_URL": f"http://127.0.0.1:{port}",
        }.items():
            env.setenv(name, value)
        world = World(url, tmp)
        site = world.site()
        src = world.location(site, "src", LocationType.SOURCE)
        world.location(site, "buf", LocationType.BUFFER)
        try:
            with (
                running_deployment(dict(os.environ), tmp / "logs", port) as deployment,
                dg.DagsterInstance.get() as instance,
            ):
                # The webserver may answer before the daemon's first heartbeat.
                wait_for("the daemon's heartbeat", lambda: _daemon_beats(instance), timeout=60)
                yield Deployed(world, deployment, src)
        finally:
            world.close()


def _daemon_beats(instance: dg.DagsterInstance) -> bool:
    statuses = instance.get_daemon_statuses(list(DAEMONS))
    return all(status.healthy for status in statuses.values())


def _key(group: Group) -> str:
    return f"src__eou{group.eou_id}__mod{group.module_id}"


def _group_with_files(world: World, src: int) -> Group:
    group = world.group(src)
    for i in range(2):
        world.file(group, f"eou{group.eou_id}/scan_{i}.fits", size=20_000 + i)
    return group


def _failed_group(world: World, src: int) -> tuple[Group, RawDataPackage]:
    """A group whose package failed for good: sensor runs leave it alone."""
    group = _group_with_files(world, src)
    with world.session() as s:
        [plan] = claim_packages(s, GroupKey.parse(_key(group)), PackageLimits(10**9, 100), "r1")
        s.execute(
            update(RawDataPackage)
            .where(RawDataPackage.id == plan.package_id)
            .values(status=Status.FAILED, lease_owner=None, failure_reason="HostUnreachable: x")
        )
        return group, s.get_one(RawDataPackage, plan.package_id)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CLI), *args], capture_output=True, text=True, timeout=120, env=dict(os.environ)
    )


def _package(world: World, package_id: int) -> RawDataPackage:
    with world.session() as s:
        return s.get_one(RawDataPackage, package_id)


def _packages_of(world: World, group: Group) -> list[RawDataPackage]:
    with world.session() as s:
        return list(
            s.scalars(
                select(RawDataPackage).where(RawDataPackage.executed_obs_unit_id == group.eou_id)
            )
        )


def _packaging_runs(instance: dg.DagsterInstance) -> list[dg.DagsterRun]:
    """The location's packaging runs (not the backlog schedule's, which may tick meanwhile)."""
    return list(instance.get_runs(dg.RunsFilter(job_name=job_name("src"))))


def test_what_cannot_be_launched_is_one_line_and_a_non_zero_exit(
    deployed: Deployed,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    key = _key(_group_with_files(deployed.world, deployed.src))

    def fails(*args: str) -> str:
        assert main(list(args)) == 1
        out, err = capsys.readouterr()
        assert out.count("\n") == 1 and out.startswith("error: ") and not err, out + err
        return out.strip()

    assert fails("backfill", "nowhere") == (
        "error: no SOURCE location named 'nowhere' (`ccat-packaging status` lists them)"
    )
    assert fails("backfill", "src", "--group", "src__eou999999__mod1") == (
        "error: group src__eou999999__mod1 has no files at 'src' "
        "(`ccat-packaging dry-run` lists the groups waiting)"
    )
    assert "is not a file-group key" in fails("backfill", "src", "--group", "src; rm -rf /")
    down = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("CCAT_DAGSTER_URL", down)
    assert fails("backfill", "src", "--group", key).startswith(
        f"error: the Dagster webserver at {down} does not answer ([Errno 111] Connection "
        "refused): start it (make prod-webserver) or set CCAT_DAGSTER_URL"
    )
    # requeue --launch finds that out before it requeues anything.
    _, failed = _failed_group(deployed.world, deployed.src)
    assert fails("requeue", "--package", failed.name, "--launch").startswith(
        f"error: the Dagster webserver at {down} does not answer"
    )
    assert _package(deployed.world, failed.id).status == Status.FAILED
    monkeypatch.setenv("CCAT_DAGSTER_URL", "http://ops:s3cret@127.0.0.1:3000")
    refused = fails("backfill", "src", "--group", key)
    assert "CCAT_DAGSTER_URL must not hold credentials" in refused and "s3cret" not in refused
    monkeypatch.setenv("CCAT_DAGSTER_URL", down)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))  # an instance no daemon serves
    assert fails("backfill", "src", "--group", key) == (
        "error: no dagster-daemon is running for the instance at DAGSTER_HOME (BACKFILL, "
        "QUEUED_RUN_COORDINATOR without a recent heartbeat): start it (make prod-daemon)"
    )
    monkeypatch.delenv("DAGSTER_HOME")
    assert fails("backfill", "src").startswith("error: DAGSTER_HOME is not set")
    # As a person runs it: the same line, exit status 1.
    person = _cli("backfill", "src", "--group", key)
    assert (person.returncode, person.stdout.count("\n")) == (1, 1), person
    assert person.stdout.startswith("error: DAGSTER_HOME is not set")


def test_with_the_sensor_stopped_a_new_group_is_discovered_and_backfilled_from_the_cli(
    deployed: Deployed,
) -> None:
    world, src = deployed.world, deployed.src
    with dg.DagsterInstance.get() as instance:
        new = _group_with_files(world, src)
        wait_for(
            "file_group_discovery to register the new group",
            lambda: instance.has_dynamic_partition(partitions_name("src"), _key(new)),
            timeout=60,
        )
        assert _packaging_runs(instance) == []  # the location's sensor is stopped: nothing ran
        failed, failed_package = _failed_group(world, src)
        _, requeued_package = _failed_group(world, src)

        backfill = _cli("backfill", "src", "--group", _key(new), "--group", _key(failed))
        assert backfill.returncode == 0, backfill.stdout + backfill.stderr
        match = re.search(
            # The failed group is new to the instance unless a discovery tick took it first.
            r"^backfill (\S+) of package_src: 2 partition\(s\), [01] newly registered$",
            backfill.stdout,
            re.M,
        )
        assert match, backfill.stdout
        backfill_id = match[1]
        assert f"{deployed.deployment.url}/runs/b/{backfill_id}?tab=runs" in backfill.stdout
        assert "next: the daemon submits one run per partition to the run queue" in backfill.stdout

        relaunch = _cli("requeue", "--package", requeued_package.name, "--launch")
        assert relaunch.returncode == 0, relaunch.stdout + relaunch.stderr
        assert f"requeued {requeued_package.name}\n" in relaunch.stdout
        assert re.search(
            r"^backfill \S+ of package_src: 1 partition\(s\), [01] newly registered$",
            relaunch.stdout,
            re.M,
        ), relaunch.stdout
        assert "sensor package_src_sensor" not in relaunch.stdout  # it launched; no advice

        def all_done() -> Sequence[dg.DagsterRun] | None:
            packages = [
                *_packages_of(world, new),
                _package(world, failed_package.id),
                _package(world, requeued_package.id),
            ]
            runs = _packaging_runs(instance)
            if len(runs) < 3 or not all(r.is_finished for r in runs):
                return None
            assert [p.status for p in packages] == [Status.COMPLETED] * 3, packages
            return runs

        try:
            runs = wait_for("the runs of both backfills to finish", all_done, timeout=240)
        except TimeoutError as timeout:
            pool = instance.event_log_storage.get_concurrency_info("assembly_localhost")
            states = {
                r.run_id: (r.tags.get(PARTITION_TAG), r.status) for r in _packaging_runs(instance)
            }
            raise AssertionError(f"{timeout}: runs {states}, pool {pool}") from None
        failures = {  # a run that failed says why
            r.run_id: [e.message for e in instance.all_logs(r.run_id) if e.is_dagster_event]
            for r in runs
            if r.status != dg.DagsterRunStatus.SUCCESS
        }
        assert not failures, failures
        ours = [r for r in runs if r.tags.get(BACKFILL_TAG) == backfill_id]
        assert sorted(r.tags[PARTITION_TAG] for r in ours) == sorted([_key(new), _key(failed)])
        assert all(SENSOR_NAME_TAG not in r.tags for r in _packaging_runs(instance))
    # The failed package was re-driven, not replaced: the same row, a fresh retry budget.
    assert [p.id for p in _packages_of(world, failed)] == [failed_package.id]
