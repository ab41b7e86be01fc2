"""The operator's view end to end, with the real processes and a real browser.

dagster-daemon and dagster-webserver run from ``scripts/run-dagster.sh`` on a PostgreSQL
instance configured like production (but one assembly slot per host). Through GraphQL the
test starts the location sensors and waits for their runs, whose assemblies take turns in
the host's pool; launches a partition backfill that packages a late file and re-drives a
failed package while the pool's slot is held (both runs wait, then assemble one at a time);
re-executes a failed sensor run from the failed step; reads each group's partition status
of its location's packages asset (failed, then materialized once fixed); runs the
``fixity_at_rest`` check of one group alone; and reloads the code location after adding a
location. Then headless chromium opens the UI, checks that
the expected names are on each page and saves screenshots under ``test-artifacts/e2e_ui/``.
"""

from __future__ import annotations

import functools
import itertools
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import dagster as dg
import pytest
from dagster._core.execution.backfill import (  # backfills have no public type (1.13)
    BulkActionStatus,
    PartitionBackfill,
)
from sqlalchemy import select

from ccat_packaging.models import LocationType, RawDataPackage, Status
from ccat_packaging.names import (
    BACKLOG_JOB,
    DISCOVERY_SENSOR,
    FIXITY_CHECK,
    PARTITION_TAG,
    SENSOR_NAME_TAG,
    backlog_asset,
    host_pool,
    packages_asset,
    partitions_name,
)
from ccat_packaging_tests.dagster_helpers import op_of
from ccat_packaging_tests.deployment import (
    LOCATION,
    REPO,
    REPOSITORY,
    Deployment,
    running_deployment,
    wait_for,
    write_test_instance,
)
from ccat_packaging_tests.world import Group

if TYPE_CHECKING:
    from playwright.sync_api import Page

pytestmark = pytest.mark.e2e

ARTIFACTS = REPO / "test-artifacts" / "e2e_ui"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PRIMECAM, CHAI = "package_primecam_raw", "package_chai_raw"
PRIMECAM_ASSET_PAGE = "/assets/raw_data_packages/primecam_raw"
POOL = host_pool("localhost")
HOLDER = "e2e-slot-holder"  # a run id that holds the pool's only slot
REPOSITORY_SELECTOR = {"repositoryLocationName": LOCATION, "repositoryName": REPOSITORY}

START_SENSOR = """
mutation($s: SensorSelector!) { startSensor(sensorSelector: $s) {
  __typename ... on Sensor { sensorState { id status } } ... on PythonError { message } } }"""
STOP_SENSOR = """
mutation($id: String!) { stopSensor(id: $id) {
  __typename ... on StopSensorMutationResult { instigationState { status } }
  ... on PythonError { message } } }"""
LAUNCH_BACKFILL = """
mutation($p: LaunchBackfillParams!) { launchPartitionBackfill(backfillParams: $p) {
  __typename ... on LaunchBackfillSuccess { backfillId } ... on PythonError { message }
  ... on InvalidSubsetError { message } } }"""
REEXECUTE = """
mutation($p: ReexecutionParams!) { launchRunReexecution(reexecutionParams: $p) {
  __typename ... on LaunchRunSuccess { run { runId } } ... on PythonError { message } } }"""
RELOAD = """
mutation($name: String!) { reloadRepositoryLocation(repositoryLocationName: $name) {
  __typename ... on PythonError { message } } }"""
LAST_TICK = """
query($s: SensorSelector!) { sensorOrError(sensorSelector: $s) { ... on Sensor {
  sensorState { ticks(limit: 1) { status timestamp } } } } }"""
SENSORS = """
query($r: RepositorySelector!) { repositoryOrError(repositorySelector: $r) {
  ... on Repository { sensors { name } } } }"""
PARTITION_STATUSES = """
query($k: AssetKeyInput!) { assetNodeOrError(assetKey: $k) { ... on AssetNode {
  assetPartitionStatuses { ... on DefaultPartitionStatuses {
    materializedPartitions failedPartitions materializingPartitions } } } } }"""
# What the check's Execute button sends, with the partition the button cannot yet choose
# (Dagster 1.13: "Executing checks on their own for partitioned assets is not yet supported").
LAUNCH_RUN = """
mutation($p: ExecutionParams!) { launchRun(executionParams: $p) {
  __typename ... on LaunchRunSuccess { run { runId } } ... on PythonError { message }
  ... on InvalidSubsetError { message } } }"""


@dataclass(frozen=True)
class Site:
    """Two SOURCE locations on this machine and a buffer. At primecam_raw group A packages
    and group B's package fails (a file is missing); at chai_raw group D's fails the same way."""

    a: Group
    b: Group
    d: Group

    def key(self, group: Group) -> str:
        location = "chai_raw" if group == self.d else "primecam_raw"
        return f"{location}__eou{group.eou_id}__mod{group.module_id}"

    def package(self, group: Group, part: int = 1) -> str:
        return f"{self.key(group)}__part{part:03d}"


def _site(world) -> tuple[Site, dict[str, tuple[Path, bytes]]]:
    """The site, and the missing files with their content, to put back later."""
    site = world.site()
    primecam = world.location(site, "primecam_raw", LocationType.SOURCE)
    chai = world.location(site, "chai_raw", LocationType.SOURCE)
    world.location(site, "ccat_buffer", LocationType.BUFFER)
    groups = {"a": world.group(primecam), "b": world.group(primecam), "d": world.group(chai)}
    missing = {}
    for name, group in groups.items():
        for i in range(3):
            world.file_bytes(group, f"{name}/scan_{i:02d}.fits", size=200_000 + i)
        if name != "a":
            path = world.root(group.location_id) / f"{name}/scan_01.fits"
            missing[name] = (path, path.read_bytes())
            path.unlink()
    return Site(**groups), missing


@pytest.fixture
def instance_env(
    world, dagster_pg_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> dict[str, str]:
    """This process's environment pointing at a fresh test instance and the world's
    operations database: for the Dagster processes and for this test's own instance."""
    home = tmp_path / "dagster_home"
    write_test_instance(home)
    for name, value in dagster_pg_env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("CCAT_SENSOR_INTERVAL_SECONDS", "5")
    return dict(os.environ)


@pytest.fixture
def artifacts() -> Path:
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True)
    return ARTIFACTS


def _start_sensor(deployment: Deployment, name: str) -> str:
    selector = {**REPOSITORY_SELECTOR, "sensorName": name}
    result = deployment.graphql(START_SENSOR, s=selector)["startSensor"]
    assert result["__typename"] == "Sensor", result
    assert result["sensorState"]["status"] == "RUNNING"
    return str(result["sensorState"]["id"])


def _wait_until_quiet(deployment: Deployment, sensor: str) -> None:
    """A stopped sensor's tick that the daemon had already begun still submits its runs, late
    on a loaded machine: wait until its last tick has ended and no new one came for 10 s."""
    selector = {**REPOSITORY_SELECTOR, "sensorName": sensor}

    def quiet() -> bool:
        state = deployment.graphql(LAST_TICK, s=selector)["sensorOrError"]["sensorState"]
        ticks = state["ticks"]
        return not ticks or (
            ticks[0]["status"] != "STARTED" and time.time() - ticks[0]["timestamp"] > 10
        )

    wait_for(f"the stopped {sensor}'s last tick to end", quiet, timeout=90)


def _runs(instance: dg.DagsterInstance, **tags: str) -> list[dg.RunRecord]:
    return list(instance.get_run_records(dg.RunsFilter(tags=tags)))


def _all_finished(instance: dg.DagsterInstance, sensor: str, count: int) -> bool:
    records = _runs(instance, **{"dagster/sensor_name": sensor})
    return len(records) >= count and all(r.dagster_run.is_finished for r in records)


def _finished_run(instance: dg.DagsterInstance, run_id: str) -> dg.DagsterRun | None:
    run = instance.get_run_by_id(run_id)
    return run if run is not None and run.is_finished else None


def _finished_backfill(instance: dg.DagsterInstance, backfill_id: str) -> PartitionBackfill | None:
    backfill = instance.get_backfill(backfill_id)
    return backfill if backfill and backfill.status != BulkActionStatus.REQUESTED else None


def _partitions(deployment: Deployment, slug: str) -> dict[str, list[str]]:
    """The partition statuses of a location's packages asset, as the asset's page shows them."""
    key = {"path": packages_asset(slug).path}
    node = deployment.graphql(PARTITION_STATUSES, k=key)["assetNodeOrError"]
    statuses = node["assetPartitionStatuses"]
    return {state: sorted(statuses[f"{state}Partitions"]) for state in ("materialized", "failed")}


def _run_fixity_check(deployment: Deployment, instance: dg.DagsterInstance, key: str) -> bool:
    """Launch the ``fixity_at_rest`` check of one group alone, wait for it, say if it passed."""
    asset = {"path": packages_asset(key.split("__")[0]).path}
    launched = deployment.graphql(
        LAUNCH_RUN,
        p={
            "selector": {
                **REPOSITORY_SELECTOR,
                "jobName": "__ASSET_JOB",
                "assetSelection": [],
                "assetCheckSelection": [{"assetKey": asset, "name": FIXITY_CHECK}],
            },
            "executionMetadata": {"tags": [{"key": PARTITION_TAG, "value": key}]},
        },
    )["launchRun"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    run_id = launched["run"]["runId"]
    run = wait_for("the fixity check", lambda: _finished_run(instance, run_id), 90)
    assert run.status == dg.DagsterRunStatus.SUCCESS
    [evaluation] = [
        e.dagster_event.asset_check_evaluation_data
        for e in instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION)
        if e.dagster_event is not None
    ]
    assert evaluation.partition == key
    return bool(evaluation.passed)


def _record_backlog(deployment: Deployment, instance: dg.DagsterInstance) -> dict[str, float]:
    """Run ``record_backlog`` from the launchpad, as an operator would between its schedule's
    ticks; primecam_raw's numbers as its asset now shows them."""
    launched = deployment.graphql(
        LAUNCH_RUN, p={"selector": {**REPOSITORY_SELECTOR, "jobName": BACKLOG_JOB}}
    )["launchRun"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    run_id = launched["run"]["runId"]
    run = wait_for("the backlog record", lambda: _finished_run(instance, run_id), 90)
    assert run.status == dg.DagsterRunStatus.SUCCESS
    # This run's record (the schedule may have recorded one meanwhile).
    [materialization] = [
        e.asset_materialization
        for e in instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION)
        if e.asset_materialization is not None
        and e.asset_materialization.asset_key == backlog_asset("primecam_raw")
    ]
    metadata = materialization.metadata
    return {k: v.value for k, v in metadata.items() if isinstance(v.value, int | float)}


def _packages(world) -> dict[str, RawDataPackage]:
    with world.session() as s:
        return {p.name: p for p in s.scalars(select(RawDataPackage))}


def _step_times(instance: dg.DagsterInstance, run_id: str, step: str) -> list[float]:
    """Start and end of the run's steps whose key starts with ``step``."""
    events = instance.all_logs(
        run_id,
        of_type={
            dg.DagsterEventType.STEP_START,
            dg.DagsterEventType.STEP_SUCCESS,
            dg.DagsterEventType.STEP_FAILURE,
        },
    )
    return [e.timestamp for e in events if op_of(e.step_key) == step]


def _blocked_by_the_pool(instance: dg.DagsterInstance, run_id: str) -> float | None:
    """When the run's assembly step was first refused a slot of the host's pool, if it was."""
    events = instance.all_logs(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT)
    return next(
        (
            e.timestamp
            for e in events
            if op_of(e.step_key) == "assemble_tar"
            and e.dagster_event is not None
            and e.dagster_event.message == f"Step blocked by limit for pool {POOL}"
        ),
        None,
    )


def _both_wait_for_the_pool(instance: dg.DagsterInstance, backfill_id: str) -> bool:
    runs = {r.dagster_run.run_id for r in _runs(instance, **{"dagster/backfill": backfill_id})}
    pending = instance.event_log_storage.get_concurrency_info(POOL).pending_run_ids
    return len(runs) == 2 and runs <= pending


def _pool_report(instance: dg.DagsterInstance, deployment: Deployment, backfill_id: str) -> str:
    """What a timeout around the pool needs explained: the backfill, the pool's holders and
    waiters, every run's status, and what the daemon itself complained of (CI keeps no
    artifacts)."""
    backfill = instance.get_backfill(backfill_id)
    info = instance.event_log_storage.get_concurrency_info(POOL)
    lines = [
        f"backfill {backfill_id}: {backfill.status if backfill else 'not found'}",
        f"pool {POOL}: limit {info.limit}, claimed {info.claimed_slots}",
        f"pending steps: {info.pending_steps}",
    ]
    for record in instance.get_run_records():
        run = record.dagster_run
        tags = {k: v for k, v in run.tags.items() if k in ("dagster/partition", "dagster/backfill")}
        lines.append(f"run {run.run_id} {run.status.value} {tags}")
    log = (deployment.logs / "daemon.log").read_text(errors="replace").splitlines()
    lines += [line for line in log if "dagster.daemon" in line and "INFO" not in line][-30:]
    return "\n".join(lines)


def _assert_assemblies_one_at_a_time(
    instance: dg.DagsterInstance, runs: list[dg.RunRecord]
) -> None:
    """The pool of the one host (limit 1) let no two assemblies overlap."""
    spans = sorted(_step_times(instance, r.dagster_run.run_id, "assemble_tar") for r in runs)
    assert all(len(span) == 2 for span in spans), spans
    for earlier, later in itertools.pairwise(spans):
        assert earlier[1] <= later[0], f"assemblies overlapped: {spans}"


def test_sensors_backfill_reexecution_and_the_ui(
    world, instance_env: dict[str, str], artifacts: Path
) -> None:
    site, missing = _site(world)  # before the code location loads: it reads locations once
    with (
        running_deployment(instance_env, artifacts / "logs") as deployment,
        dg.DagsterInstance.get() as instance,
        _screens(deployment, artifacts) as screens,
    ):
        # 1. One sensor per SOURCE location, started through GraphQL.
        primecam_sensor = _start_sensor(deployment, f"{PRIMECAM}_sensor")
        _start_sensor(deployment, f"{CHAI}_sensor")
        wait_for(
            "the sensor runs",
            lambda: (
                _all_finished(instance, f"{PRIMECAM}_sensor", 2)
                and _all_finished(instance, f"{CHAI}_sensor", 1)
            ),
            timeout=120,
        )
        # The three runs' assemblies took turns in the host's pool (limit 1 in this instance).
        _assert_assemblies_one_at_a_time(
            instance, _runs(instance, **{"ccat/source_host": "localhost"})
        )
        packages = _packages(world)
        assert packages[site.package(site.a)].status == Status.COMPLETED
        for group, name in ((site.b, "b"), (site.d, "d")):
            failed = packages[site.package(group)]
            assert failed.status == Status.FAILED
            assert f"'{name}/scan_01.fits' is missing" in (failed.failure_reason or "")
        # Each group's partition of its location's packages asset says so (red in the UI).
        assert _partitions(deployment, "primecam_raw") == {
            "materialized": [site.key(site.a)],
            "failed": [site.key(site.b)],
        }
        assert _partitions(deployment, "chai_raw") == {
            "materialized": [],
            "failed": [site.key(site.d)],
        }
        screens.shot(
            "00a_failed_partition",
            f"{PRIMECAM_ASSET_PAGE}?view=partitions",
            [site.key(site.b), "Failed (1)"],
        )

        # 2. Re-execute chai_raw's failed sensor run from the failed step, file restored.
        # The primecam sensor stops first, so that the backfill below has its groups.
        stopped = deployment.graphql(STOP_SENSOR, id=primecam_sensor)["stopSensor"]
        assert stopped["instigationState"]["status"] == "STOPPED", stopped
        _wait_until_quiet(deployment, f"{PRIMECAM}_sensor")
        [failed_run] = _runs(instance, **{"dagster/sensor_name": f"{CHAI}_sensor"})
        path, content = missing["d"]
        path.write_bytes(content)
        relaunched = deployment.graphql(
            REEXECUTE,
            p={"parentRunId": failed_run.dagster_run.run_id, "strategy": "FROM_FAILURE"},
        )["launchRunReexecution"]
        assert relaunched["__typename"] == "LaunchRunSuccess", relaunched
        rerun_id = relaunched["run"]["runId"]
        rerun = wait_for("the re-execution", lambda: _finished_run(instance, rerun_id), 90)
        assert rerun.status == dg.DagsterRunStatus.SUCCESS
        assert _step_times(instance, rerun_id, "create_package_records") == []
        assert _packages(world)[site.package(site.d)].status == Status.COMPLETED
        assert _partitions(deployment, "chai_raw") == {
            "materialized": [site.key(site.d)],
            "failed": [],
        }

        # 3. A backfill of A and B: A's late file goes into a new part, B's failed package is
        # re-driven. The host's only pool slot is held meanwhile, so both runs wait for it.
        # (The primecam sensor, stopped for a while now, must not take the late file.)
        path, content = missing["b"]
        path.write_bytes(content)
        world.file_bytes(site.a, "a/late/scan_99.fits", size=150_000)
        storage = instance.event_log_storage
        assert storage.get_concurrency_info(POOL).slot_count == 1
        assert storage.claim_concurrency_slot(POOL, HOLDER, "hold").is_claimed
        launched = deployment.graphql(
            LAUNCH_BACKFILL,
            p={
                "selector": {
                    "partitionSetName": f"{PRIMECAM}_partition_set",
                    "repositorySelector": REPOSITORY_SELECTOR,
                },
                "partitionNames": [site.key(site.a), site.key(site.b)],
                "title": "re-drive primecam_raw",
            },
        )["launchPartitionBackfill"]
        assert launched["__typename"] == "LaunchBackfillSuccess", launched
        backfill_id = launched["backfillId"]
        try:
            wait_for(
                "both backfill runs to wait for the pool",
                lambda: _both_wait_for_the_pool(instance, backfill_id),
                timeout=180,
            )
        except TimeoutError as timeout:
            raise AssertionError(
                f"{timeout}\n{_pool_report(instance, deployment, backfill_id)}"
            ) from None
        backfill_runs = _runs(instance, **{"dagster/backfill": backfill_id})
        assert len(backfill_runs) == 2
        # Each run's assembly asked the pool for the slot and was refused it...
        blocked_at = {
            run_id: wait_for(
                f"run {run_id}'s assembly to be blocked by the pool",
                functools.partial(_blocked_by_the_pool, instance, run_id),
                timeout=60,
            )
            for run_id in (r.dagster_run.run_id for r in backfill_runs)
        }
        for run_id in blocked_at:
            assert _step_times(instance, run_id, "assemble_tar") == []
        released_at = time.time()
        storage.free_concurrency_slots_for_run(HOLDER)
        backfill = wait_for(
            "the backfill", lambda: _finished_backfill(instance, backfill_id), timeout=120
        )
        assert backfill.status == BulkActionStatus.COMPLETED_SUCCESS
        # ...and started only once the holder had given the slot back.
        for run_id, blocked in blocked_at.items():
            started = _step_times(instance, run_id, "assemble_tar")[0]
            assert blocked < released_at < started, (blocked, released_at, started)
        _assert_assemblies_one_at_a_time(instance, backfill_runs)
        packages = _packages(world)
        redriven = packages[site.package(site.b)]
        assert (redriven.status, redriven.retry_count) == (Status.COMPLETED, 0)
        assert packages[site.package(site.a, part=2)].status == Status.COMPLETED
        assert len(_runs(instance, **{"dagster/sensor_name": f"{PRIMECAM}_sensor"})) == 2
        assert _partitions(deployment, "primecam_raw") == {
            "materialized": sorted([site.key(site.a), site.key(site.b)]),
            "failed": [],
        }
        # The fixity check of A's two packages at rest, in a run of its own.
        assert _run_fixity_check(deployment, instance, site.key(site.a))

        # 3b. A group no sensor has seen: filed while the primecam sensor is stopped, its
        # partition comes from file_group_discovery alone and shows as missing; a backfill
        # (what the UI's dialog sends) packages it. The backlog, recorded before and after,
        # counts its file and then none.
        new = world.group(site.a.location_id)
        world.file_bytes(new, "e/scan_00.fits", size=120_000)
        new_key = f"primecam_raw__eou{new.eou_id}__mod{new.module_id}"
        wait_for(
            "file_group_discovery to register the new group",
            lambda: instance.has_dynamic_partition(partitions_name("primecam_raw"), new_key),
            timeout=60,
        )
        statuses = _partitions(deployment, "primecam_raw")
        assert new_key not in statuses["materialized"] + statuses["failed"]  # missing
        assert _record_backlog(deployment, instance)["unpackaged_files"] == 1
        screens.shot(
            "00b_new_group_missing",
            f"{PRIMECAM_ASSET_PAGE}?view=partitions",
            [new_key, "Missing (1)"],
        )
        launched = deployment.graphql(
            LAUNCH_BACKFILL,
            p={
                "selector": {
                    "partitionSetName": f"{PRIMECAM}_partition_set",
                    "repositorySelector": REPOSITORY_SELECTOR,
                },
                "partitionNames": [new_key],
                "title": "a group no sensor has seen",
            },
        )["launchPartitionBackfill"]
        assert launched["__typename"] == "LaunchBackfillSuccess", launched
        new_backfill = wait_for(
            "the new group's backfill",
            lambda: _finished_backfill(instance, launched["backfillId"]),
            timeout=120,
        )
        assert new_backfill.status == BulkActionStatus.COMPLETED_SUCCESS
        assert new_key in _partitions(deployment, "primecam_raw")["materialized"]
        [new_run] = _runs(instance, **{PARTITION_TAG: new_key})
        assert SENSOR_NAME_TAG not in new_run.dagster_run.tags
        assert _packages(world)[f"{new_key}__part001"].status == Status.COMPLETED
        assert _record_backlog(deployment, instance)["unpackaged_files"] == 0

        # 4. A new location gets its sensor once the code location is reloaded.
        world.location(world.site("cologne"), "cologne_raw", LocationType.SOURCE)
        reloaded = deployment.graphql(RELOAD, name=LOCATION)["reloadRepositoryLocation"]
        assert reloaded["__typename"] == "WorkspaceLocationEntry", reloaded
        sensors = deployment.graphql(SENSORS, r=REPOSITORY_SELECTOR)["repositoryOrError"]
        assert "package_cologne_raw_sensor" in {s["name"] for s in sensors["sensors"]}

        # 5. The primecam sensor once more: nothing new, and its ticks say so (the UI waits).
        _start_sensor(deployment, f"{PRIMECAM}_sensor")
        redrive_run = next(
            r.dagster_run.run_id
            for r in backfill_runs
            if r.dagster_run.tags["dagster/partition"] == site.key(site.b)
        )
        _browse(screens, site, backfill_id, redrive_run)


class Screens:
    """Headless chromium on the UI for the whole test: a shot waits for the texts an operator
    would look for on the page, then saves it."""

    def __init__(self, page: Page, url: str, artifacts: Path) -> None:
        self.page, self.url, self.artifacts = page, url, artifacts

    def shot(self, name: str, path: str | None, expected: list[str]) -> None:
        page = self.page
        if path is not None:
            page.goto(self.url + path)
            page.wait_for_load_state("networkidle")
        for text in expected:
            found = page.get_by_text(text).first
            found.wait_for()
            found.scroll_into_view_if_needed()
        page.wait_for_timeout(1000)  # dialogs fade in, tables fill in
        page.screenshot(path=str(self.artifacts / f"{name}.png"))


@contextmanager
def _screens(deployment: Deployment, artifacts: Path) -> Iterator[Screens]:
    from playwright.sync_api import sync_playwright

    assert CHROMIUM.exists(), "run scripts/test-setup.sh: it installs Debian's chromium"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.set_default_timeout(30_000)
            yield Screens(page, deployment.url, artifacts)
        finally:
            browser.close()


def _browse(screens: Screens, site: Site, backfill_id: str, run_id: str) -> None:
    page, shot = screens.page, screens.shot
    shot(
        "01_sensors",
        "/automation",
        [
            "Standard sensor",  # shown once the sensors' states have loaded
            f"{PRIMECAM}_sensor",
            f"{CHAI}_sensor",
            "package_cologne_raw_sensor",
            DISCOVERY_SENSOR,
        ],
    )
    shot("02_sensor", f"/locations/{LOCATION}/sensors/{PRIMECAM}_sensor", ["~5 sec"])
    page.get_by_role("button", name="0 runs requested").first.click()
    shot("03_skipped_tick", None, ["no new unpackaged files at 'primecam_raw'"])
    shot(
        "04_partitions",
        f"/locations/{LOCATION}/jobs/{PRIMECAM}/partitions",
        # The groups themselves are listed on the asset's page (08).
        ["Total partitions", "raw_data_packages/primecam_raw", "Backfill history"],
    )
    shot("05_backfill", f"/runs/b/{backfill_id}?tab=runs", ["Succeeded"])
    page.goto(f"{screens.url}/runs/{run_id}")
    step = f"{packages_asset('primecam_raw').to_python_identifier()}.{{op}}[part001]"
    page.get_by_placeholder("Filter…").fill("step:" + step.format(op="assemble_tar"))
    shot("06_run_waits_for_pool", None, [f"Step blocked by limit for pool {POOL}"])
    page.get_by_placeholder("Filter…").fill("step:" + step.format(op="register_at_buffer"))
    page.get_by_text('Yielded output "result" of type "String?"').wait_for()  # filter applied
    page.get_by_text("View full message").first.click()
    shot("07_run_metadata", None, ["buffer_path", "sha256:", "throughput_MB_per_s"])
    shot(
        "08_package_partitions",
        f"{PRIMECAM_ASSET_PAGE}?view=partitions",
        [site.key(site.a), site.key(site.b), "Materialized (3)", "Failed (0)"],
    )
    page.get_by_text(site.key(site.b), exact=True).first.click()
    shot("09_partition_packages", None, [site.package(site.b), "built_by_this_run"])
    shot(
        "10_fixity_check",
        f"{PRIMECAM_ASSET_PAGE}?view=checks",
        ["fixity_at_rest", "Passed", "match their recorded size and checksum"],
    )
    # Its numeric metadata over its materializations (Overview > Metadata > Plots).
    page.goto(f"{screens.url}/assets/{'/'.join(backlog_asset('primecam_raw').path)}")
    page.get_by_role("button", name="Plots").click()
    shot("11_backlog_plots", None, ["unpackaged_files", "oldest_unpackaged_age_seconds"])
