"""The production instance and workspace files load, with the settings operators rely on."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.definitions.run_request import InstigatorType  # no public name (1.13)
from dagster._core.scheduler.instigation import TickStatus  # no public name (1.13)

from ccat_packaging.celery_launcher import SiteRunLauncher
from ccat_packaging.models import LocationType

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def pg_env(dagster_pg_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for name, value in dagster_pg_env.items():
        monkeypatch.setenv(name, value)
    return dagster_pg_env


def _instance(config: Path, home: Path) -> Iterator[dg.DagsterInstance]:
    home.mkdir(exist_ok=True)
    shutil.copy(config, home / "dagster.yaml")
    with dg.DagsterInstance.from_config(str(home)) as instance:
        yield instance


@pytest.fixture
def production(pg_env, tmp_path: Path) -> Iterator[dg.DagsterInstance]:
    yield from _instance(REPO / "dagster.yaml", tmp_path / "home")


def test_the_production_instance_is_postgres_with_queue_pools_monitoring_and_retention(
    production: dg.DagsterInstance,
) -> None:
    instance = production
    assert type(instance.run_storage).__name__ == "PostgresRunStorage"
    assert instance.get_run_records(dg.RunsFilter(), limit=1) == []  # really connected
    assert isinstance(instance.run_coordinator, dg.QueuedRunCoordinator)
    concurrency = instance.get_concurrency_config()
    assert concurrency.run_queue_config is not None
    assert concurrency.run_queue_config.max_concurrent_runs == 8
    # Per source host: the pool of assemble_tar, for sensor runs and backfills alike.
    assert concurrency.pool_config.default_pool_limit == 2
    assert instance.run_monitoring_enabled
    assert instance.run_monitoring_settings["free_slots_after_run_end_seconds"] == 300
    assert instance.run_retries_enabled and instance.run_retries_max_retries == 2
    assert not instance.run_retries_retry_on_asset_or_op_failure
    sensor_ticks = instance.get_tick_retention_settings(InstigatorType.SENSOR)
    assert sensor_ticks[TickStatus.SKIPPED] == 1 and sensor_ticks[TickStatus.FAILURE] == 90
    schedule_ticks = instance.get_tick_retention_settings(InstigatorType.SCHEDULE)
    assert set(schedule_ticks.values()) == {90}


def test_the_scale_out_example_loads_with_a_celery_run_launcher(
    pg_env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CCAT_CELERY_BROKER_URL", "pyamqp://guest:guest@127.0.0.1:5672//")
    monkeypatch.setenv("CCAT_CELERY_BACKEND_URL", "redis://127.0.0.1:6379/0")
    config = REPO / "docs" / "examples" / "dagster-celery.yaml"
    for instance in _instance(config, tmp_path / "home"):
        launcher = instance.run_launcher
        assert isinstance(launcher, SiteRunLauncher)
        assert launcher.default_queue == "ccat_central"
        assert instance.get_concurrency_config().pool_config.default_pool_limit == 2


def test_the_workspace_loads_the_code_location_on_the_production_instance(
    world, production: dg.DagsterInstance
) -> None:
    site = world.site()
    world.location(site, "primecam_raw", LocationType.SOURCE)
    world.location(site, "buf", LocationType.BUFFER)
    dagster = Path(sys.executable).parent / "dagster"
    result = subprocess.run(
        [str(dagster), "definitions", "validate", "-w", "workspace.yaml"],
        cwd=REPO,
        env={**os.environ, "DAGSTER_HOME": str(production.root_directory)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Validation successful for code location ccat_packaging" in (
        result.stdout + result.stderr
    )
