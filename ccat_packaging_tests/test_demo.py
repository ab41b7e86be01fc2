"""The README's demo commands, small, as a person runs them: `make demo` (the real CLI, real
files, the real daemon ticking the real sensors), then `make ui` on the same instance, asked
through the webserver's GraphQL what the UI shows, then `make demo` once more."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import yaml
from sqlalchemy import select

from ccat_packaging import names
from ccat_packaging.db import make_engine, session_scope
from ccat_packaging.demo import PRODUCTION_INSTANCE, write_instance
from ccat_packaging.models import RawDataFile, RawDataPackage, Status
from ccat_packaging_tests.deployment import (
    LOCATION,
    REPOSITORY,
    Deployment,
    free_port,
    start_in_own_session,
    wait_until_loaded,
)

LOCATIONS = ["primecam_raw_data", "chai_raw_data"]
REPOSITORY_SELECTOR = {"repositoryLocationName": LOCATION, "repositoryName": REPOSITORY}
RUNS = """
query($job: String!) { runsOrError(filter: {pipelineName: $job}) { ... on Runs { results {
  runId status repositoryOrigin { repositoryLocationName } tags { key value }
  assetMaterializations { assetKey { path } partition } } } } }"""
SENSOR = """
query($s: SensorSelector!) { sensorOrError(sensorSelector: $s) { __typename ... on Sensor {
  sensorState { status ticks(limit: 100) { status runIds } } } } }"""
PARTITIONS = """
query($r: RepositorySelector!, $name: String!) {
  partitionSetOrError(repositorySelector: $r, partitionSetName: $name) { __typename
    ... on PartitionSet { partitionStatusesOrError { __typename
      ... on PartitionStatuses { results { partitionName runStatus } } } } } }"""
ASSET_NODES = """
query($r: RepositorySelector!) { repositoryOrError(repositorySelector: $r) {
  ... on Repository { assetNodes { assetKey { path } partitionDefinition { dimensionTypes {
    dynamicPartitionsDefinitionName } }
    assetPartitionStatuses { __typename ... on DefaultPartitionStatuses {
      materializedPartitions failedPartitions } } } } } }"""


def _demo(root: Path) -> str:
    done = subprocess.run(
        [
            *(sys.executable, "-m", "ccat_packaging.cli", "demo", "--root", str(root)),
            *("--size-scale", "0.01", "--obs-units", "1"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=root.parent,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _processes_on(home: Path) -> list[int]:
    """Processes whose environment names this Dagster instance: the demo's daemon, its code
    servers and run workers, the UI's webserver."""
    found = []
    needle = f"DAGSTER_HOME={home}".encode()
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if needle in environ.read_bytes().split(b"\0"):
                found.append(int(environ.parent.name))
        except OSError:
            continue  # gone meanwhile, or not ours to read
    return found


def _table(output: str) -> list[str]:
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("package "))
    end = next(i for i, line in enumerate(lines) if line.startswith("archives: "))
    return lines[start:end]


def test_the_demo_instance_is_production_less_its_storage(
    dagster_pg_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    production_config = yaml.safe_load(PRODUCTION_INSTANCE.read_text())
    demo_config = yaml.safe_load(write_instance(tmp_path / "demo").read_text())
    assert demo_config == {k: v for k, v in production_config.items() if k != "storage"}
    # And Dagster makes the same of both (the production one on a real PostgreSQL).
    for name, value in dagster_pg_env.items():
        monkeypatch.setenv(name, value)
    (tmp_path / "production").mkdir()
    shutil.copy(PRODUCTION_INSTANCE, tmp_path / "production" / "dagster.yaml")
    with (
        dg.DagsterInstance.from_config(str(tmp_path / "demo")) as demo,
        dg.DagsterInstance.from_config(str(tmp_path / "production")) as production,
    ):
        assert type(demo.run_storage).__name__ == "SqliteRunStorage"
        assert type(production.run_storage).__name__ == "PostgresRunStorage"
        assert _effective(demo) == _effective(production)
        concurrency = demo.get_concurrency_config()
        assert concurrency.pool_config.default_pool_limit == 2
        assert concurrency.run_queue_config and concurrency.run_queue_config.max_concurrent_runs
        assert not demo.telemetry_enabled and not demo.nux_enabled


def _effective(instance: dg.DagsterInstance) -> dict[str, object]:
    """What the instance does with its config (DagsterInstance's properties; Dagster 1.13 has
    no public type for the parsed config)."""
    coordinator = instance.run_coordinator
    assert isinstance(coordinator, dg.QueuedRunCoordinator)
    return {
        "concurrency": instance.get_concurrency_config(),
        "dequeue": (
            coordinator.dequeue_interval_seconds,
            coordinator.dequeue_use_threads,
            coordinator.dequeue_num_workers,
        ),
        "run_launcher": type(instance.run_launcher).__name__,
        "monitoring": (instance.run_monitoring_enabled, instance.run_monitoring_settings),
        "retries": (instance.run_retries_enabled, instance.run_retries_max_retries),
        "telemetry": instance.telemetry_enabled,
        "nux": instance.nux_enabled,
    }


def test_after_the_demo_the_ui_shows_its_runs_ticks_and_packaged_groups(tmp_path: Path) -> None:
    root = tmp_path / "demo"
    home = root / "dagster_home"
    first = _demo(root)
    assert "filed 51 raw files" in first
    assert "5 packages" in first and "this demo ran 5 run(s), 0 failed" in first, first
    assert "turning the sensors on" in first and "dagster-daemon stopped" in first
    assert _processes_on(home) == []
    table = _table(first)
    assert len(table) == 6 and max(len(line) for line in table) <= 100, table

    engine = make_engine(f"sqlite:///{root / 'ops_db.sqlite'}")
    with session_scope(engine) as s:
        packages = s.scalars(select(RawDataPackage)).all()
        files = s.scalars(select(RawDataFile)).all()
        assert {p.status for p in packages} == {Status.COMPLETED}
        assert all(f.raw_data_package_id is not None for f in files)
        for package in packages:
            tar = root / "buffers" / "ccat_buffer" / package.relative_path
            listed = subprocess.run(
                ["tar", "-tf", str(tar)], capture_output=True, text=True, check=True
            ).stdout.split()
            filed = sorted(f.relative_path for f in files if f.raw_data_package_id == package.id)
            assert sorted(listed) == filed
            digest = subprocess.run(
                ["sha256sum", str(tar)], capture_output=True, text=True, check=True
            ).stdout.split()[0]
            assert digest == package.checksum
            assert f"{package.name}  " in "\n".join(table)
        groups = {p.name.rsplit("__part", 1)[0] for p in packages}
    engine.dispose()

    logs = tmp_path / "logs"
    logs.mkdir()
    port = free_port()
    ui_command = [sys.executable, "-m", "ccat_packaging.cli", "ui", "--root", str(root)]
    process = start_in_own_session(
        [*ui_command, "--port", str(port)], dict(os.environ), logs / "ui.log"
    )
    try:
        ui = Deployment(port, {"ui": process}, logs)
        wait_until_loaded(ui, timeout=120)
        _assert_the_ui_shows(ui, groups)
    finally:
        process.send_signal(signal.SIGINT)  # Ctrl-C
        try:
            code = process.wait(timeout=90)
            left = _processes_on(home)
        finally:
            for pid in _processes_on(home):  # the test's own, should the UI leave any
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    output = (logs / "ui.log").read_text()
    assert code == 0 and left == [], output
    assert re.search(r"\w+Warning: ", output) is None, output  # Python's warnings
    assert "Telemetry" not in output and "Welcome to Dagster" not in output, output

    second = _demo(root)
    assert "this demo ran 0 run(s)" in second and "5 packages" in second
    assert _table(second) == table


def _assert_the_ui_shows(ui: Deployment, groups: set[str]) -> None:
    """Per location: its runs, from this code location, one successful run per group; its
    sensor running, with the tick that requested them; every group's partition succeeded,
    and materialized in the location's packages asset."""
    nodes = ui.graphql(ASSET_NODES, r=REPOSITORY_SELECTOR)["repositoryOrError"]["assetNodes"]
    for location in LOCATIONS:
        mine = {g for g in groups if g.startswith(f"{location}__")}
        assert mine, groups
        runs = ui.graphql(RUNS, job=names.job_name(location))["runsOrError"]["results"]
        assert {r["repositoryOrigin"]["repositoryLocationName"] for r in runs} == {LOCATION}
        assert {r["status"] for r in runs} == {"SUCCESS"}, runs
        assert sorted(_tag(r, "dagster/partition") for r in runs) == sorted(mine)
        materialized = {
            m["partition"]
            for r in runs
            for m in r["assetMaterializations"]
            if m["assetKey"]["path"] == names.packages_asset(location).path
        }
        assert materialized == mine

        selector = {**REPOSITORY_SELECTOR, "sensorName": names.sensor_name(location)}
        sensor = ui.graphql(SENSOR, s=selector)["sensorOrError"]
        assert sensor["__typename"] == "Sensor", sensor
        assert sensor["sensorState"]["status"] == "RUNNING"
        requested = {
            run_id
            for tick in sensor["sensorState"]["ticks"]
            if tick["status"] == "SUCCESS"
            for run_id in tick["runIds"]
        }
        assert requested == {r["runId"] for r in runs}

        partition_set = f"{names.job_name(location)}_partition_set"
        statuses = ui.graphql(PARTITIONS, r=REPOSITORY_SELECTOR, name=partition_set)
        results = statuses["partitionSetOrError"]["partitionStatusesOrError"]["results"]
        assert {p["partitionName"]: p["runStatus"] for p in results} == dict.fromkeys(
            mine, "SUCCESS"
        )
        [node] = [n for n in nodes if n["assetKey"]["path"] == names.packages_asset(location).path]
        [dimension] = node["partitionDefinition"]["dimensionTypes"]
        assert dimension["dynamicPartitionsDefinitionName"] == names.partitions_name(location)
        status = node["assetPartitionStatuses"]
        assert set(status["materializedPartitions"]) == mine, node
        assert status["failedPartitions"] == [], node


def _tag(run: dict[str, Any], key: str) -> str:
    return next(t["value"] for t in run["tags"] if t["key"] == key)
