"""The deployment on the observatory's topology (``topology.py``): the daemon and webserver at the
central site, a Celery worker on the telescope site's buffer host, instrument computers reached
over SSH, and what crosses which link, read from the interfaces' byte counters.

Each test has its own operations database, Dagster instance, daemon and worker; the network,
the broker and the hosts' sshd are shared by the module.
"""

from __future__ import annotations

import contextlib
import os
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest

from ccat_packaging.assembly import tar_agent
from ccat_packaging.models import LocationType, RawDataPackage, Status
from ccat_packaging.names import CELERY_QUEUE_TAG, SENSOR_NAME_TAG, SOURCE_LOCATION_TAG
from ccat_packaging_tests.deployment import (
    CELERY_INSTANCE,
    LOCATION,
    REPOSITORY,
    Deployment,
    running_deployment,
    wait_for,
    write_test_instance,
)
from ccat_packaging_tests.package_checks import (
    MB,
    assert_completed_and_intact,
    big_file,
    leftovers,
    packages_of,
)
from ccat_packaging_tests.topology import SITE, Observatory, Worker, observatory
from ccat_packaging_tests.world import Group, World

pytestmark = pytest.mark.topology

QUEUE = f"ccat_{SITE}"
START_SENSOR = """
mutation($s: SensorSelector!) { startSensor(sensorSelector: $s) {
  __typename ... on Sensor { sensorState { status } } ... on PythonError { message } } }"""


@pytest.fixture(scope="module")
def obs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Observatory]:
    if os.geteuid() != 0:
        pytest.fail("the topology tests create network namespaces: run them as root")
    with observatory(tmp_path_factory.mktemp("observatory"), prefix="ccatt", net=79) as built:
        yield built


@dataclass
class Telescope:
    """The site's locations in the operations database, and the environments of the
    deployment's central and site processes."""

    world: World
    instr1: int
    instr2: int
    buffer: int
    central: dict[str, str]
    site: dict[str, str]
    logs: Path

    def group(self, location: int, name: str, files: int, size: int) -> Group:
        group = self.world.group(location)
        for i in range(files):
            big_file(self.world, group, f"{name}/obs_{i:03d}.dat", size)
        return group


@pytest.fixture
def telescope(
    obs: Observatory, world, dagster_pg_env: dict[str, str], tmp_path: Path, monkeypatch
) -> Iterator[Telescope]:
    hosts = obs.network.hosts
    site = world.site(SITE)

    def location(name: str, host: str, kind: LocationType) -> int:
        root = obs.disk(host) / f"{name}_{tmp_path.name}"
        return int(
            world.location(site, name, kind, host=hosts[host].address, user="root", root=root)
        )

    instr1 = location("instr1_raw", "instr1", LocationType.SOURCE)
    instr2 = location("instr2_raw", "instr2", LocationType.SOURCE)
    buffer = location("telescope_buffer", "buffer", LocationType.BUFFER)
    home = tmp_path / "dagster_home"
    write_test_instance(home, CELERY_INSTANCE)
    central = {
        **obs.central_env(dagster_pg_env, world.url, home),
        "CCAT_SENSOR_INTERVAL_SECONDS": "3",
        "CCAT_STALE_AFTER_SECONDS": "20",
        "CCAT_RETRY_BASE_SECONDS": "1",
    }
    for name, value in central.items():
        monkeypatch.setenv(name, value)  # this test's own DagsterInstance.get()
    yield Telescope(world, instr1, instr2, buffer, central, obs.site_env(central), tmp_path)
    for host in ("instr1", "instr2", "buffer", "uplink"):
        obs.network.shape(host, None)
    obs.network.set_uplink(True)


def _start_sensors(deployment: Deployment, *locations: str) -> None:
    for location in locations:
        selector = {
            "repositoryLocationName": LOCATION,
            "repositoryName": REPOSITORY,
            "sensorName": f"package_{location}_sensor",
        }
        result = deployment.graphql(START_SENSOR, s=selector)["startSensor"]
        assert result["__typename"] == "Sensor", result


@dataclass
class SiteWorker:
    """The site's worker across its restarts: whichever runs at the end is stopped."""

    obs: Observatory
    telescope: Telescope
    current: Worker | None = None

    def start(self) -> None:
        self.current = self.obs.start_worker(
            self.telescope.site, self.telescope.logs / "worker.log"
        )

    def kill(self) -> None:
        assert self.current is not None
        self.current.kill()
        self.current = None

    def stop(self) -> None:
        if self.current is not None:
            self.current.stop()
            self.current = None


@contextlib.contextmanager
def _deployed(
    obs: Observatory, telescope: Telescope, *, worker_up: bool = True
) -> Iterator[tuple[Deployment, dg.DagsterInstance, SiteWorker]]:
    """The central deployment, this test's view of its instance, and the site's worker."""
    worker = SiteWorker(obs, telescope)
    try:
        if worker_up:
            worker.start()
        with (
            running_deployment(telescope.central, telescope.logs) as deployment,
            dg.DagsterInstance.get() as instance,
        ):
            yield deployment, instance, worker
    finally:
        worker.stop()


def _slow_package_in_flight(telescope: Telescope, deployment: Deployment) -> None:
    """instr1's package (128 MiB at ~20 MB/s: several seconds) being written at the buffer."""
    _start_sensors(deployment, "instr1_raw")
    wait_for("a temporary archive", lambda: _temporary_archive(telescope), 120, every=0.1)


def _finished_runs(instance: dg.DagsterInstance, count: int) -> list[dg.DagsterRun] | None:
    runs = _runs(instance)
    done = [r for r in runs if r.is_finished]
    return done if len(runs) >= count and len(done) == len(runs) else None


def _completed(telescope: Telescope, count: int) -> list[RawDataPackage] | None:
    packages = packages_of(telescope.world)
    done = [p for p in packages if p.status == Status.COMPLETED]
    return done if len(done) >= count else None


def _members(telescope: Telescope, package: RawDataPackage) -> list[str]:
    root = telescope.world.root(telescope.buffer)
    with tarfile.open(root / package.relative_path) as tar:
        return tar.getnames()


def _local_build(telescope: Telescope, location: int, members: list[str]) -> str:
    """The checksum of the same members built here, in this process, by the same agent."""
    root = telescope.world.root(location)
    (telescope.logs / "local_build").mkdir(exist_ok=True)
    built = tar_agent.build(
        tar_agent.BuildSpec(
            source_root=str(root),
            members=[[m, (root / m).stat().st_size] for m in members],
            dest_root=str(telescope.logs / "local_build"),
            dest_relative="local.tar",
            checksums={},
        ),
        tar_agent.Progress(),
    )
    Path(built["temp_path"]).unlink()
    return built["checksum"]


def test_runs_execute_at_the_site_and_package_bytes_cross_only_source_to_buffer_links(
    obs: Observatory, telescope: Telescope
) -> None:
    telescope.group(telescope.instr1, "a", files=2, size=64 * MB)
    telescope.group(telescope.instr2, "b", files=3, size=40 * MB)
    with _deployed(obs, telescope) as (deployment, instance, _):
        before = obs.network.link_bytes()
        _start_sensors(deployment, "instr1_raw", "instr2_raw")
        runs = wait_for("two finished runs", lambda: _finished_runs(instance, 2), 240)
        after = obs.network.link_bytes()

    assert {r.status for r in runs} == {dg.DagsterRunStatus.SUCCESS}
    assert {r.tags[CELERY_QUEUE_TAG] for r in runs} == {QUEUE}
    assert {r.tags[SENSOR_NAME_TAG] for r in runs} == {
        "package_instr1_raw_sensor",
        "package_instr2_raw_sensor",
    }
    packages = {p.source_location_id: p for p in packages_of(telescope.world)}
    for location, prefix, files in ((telescope.instr1, "a", 2), (telescope.instr2, "b", 3)):
        package = packages[location]
        assert_completed_and_intact(telescope.world, telescope.buffer, package)
        members = [f"{prefix}/obs_{i:03d}.dat" for i in range(files)]
        assert _members(telescope, package) == members
        assert package.checksum == _local_build(telescope, location, members)
    assert leftovers(telescope.world.root(telescope.buffer)) == []

    moved = {name: after[name] - before[name] for name in after}
    p1 = packages[telescope.instr1].size or 0
    p2 = packages[telescope.instr2].size or 0
    print({name: (d.received, d.sent) for name, d in moved.items()}, "packages", p1, p2)
    # Each instrument computer sent its package once (plus TCP/IP and SSH framing, ~5 %) ...
    for name, size in (("instr1", p1), ("instr2", p2)):
        assert size <= moved[name].sent <= size * 1.08 + MB, (name, moved[name], size)
        assert moved[name].received < size * 0.05, (name, moved[name], size)
    # ... the buffer host received both and sent back only acknowledgements ...
    assert p1 + p2 <= moved["buffer"].received <= (p1 + p2) * 1.08 + 2 * MB, moved["buffer"]
    assert moved["buffer"].sent < (p1 + p2) * 0.05, moved["buffer"]
    # ... and the uplink carried control traffic only.
    uplink = moved["uplink"].received + moved["uplink"].sent
    assert uplink < (p1 + p2) * 0.01, (uplink, p1 + p2)


def _runs(instance: dg.DagsterInstance) -> list[dg.DagsterRun]:
    """The packaging runs: not the backlog schedule's, which no worker of this topology takes
    (it belongs on the central site's queue, docs/examples/dagster-celery.yaml)."""
    return [
        r.dagster_run
        for r in instance.get_run_records()
        if r.dagster_run.tags.get(SOURCE_LOCATION_TAG) is not None
    ]


def _failure_messages(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    events = instance.all_logs(run_id, of_type=dg.DagsterEventType.RUN_FAILURE)
    return [e.message for e in events]


def _temporary_archive(telescope: Telescope) -> list[str]:
    return leftovers(telescope.world.root(telescope.buffer))


def _assert_one_intact_package(telescope: Telescope) -> None:
    [package] = packages_of(telescope.world)
    assert_completed_and_intact(telescope.world, telescope.buffer, package)
    assert _temporary_archive(telescope) == []


@pytest.mark.parametrize(
    ("comes_back", "noticed"),
    [
        # back only once run monitoring gave up on it: noticed by its silence on the broker
        ("after", f"Celery worker {SITE}@buffer has not answered on the broker for"),
        # back at once (a service manager restarting it): it answers without the run's task
        ("at once", f"Celery worker {SITE}@buffer answers, but no longer runs this run's task"),
    ],
)
def test_a_worker_killed_mid_assembly_is_noticed_and_its_package_completes_once(
    obs: Observatory, telescope: Telescope, comes_back: str, noticed: str
) -> None:
    telescope.group(telescope.instr1, "a", files=2, size=64 * MB)
    obs.network.shape("instr1", 160)
    with _deployed(obs, telescope) as (deployment, instance, worker):
        _slow_package_in_flight(telescope, deployment)
        worker.kill()
        [first] = _runs(instance)
        if comes_back == "at once":
            worker.start()
        wait_for(
            "run monitoring to fail the run of the dead worker",
            lambda: _failure_messages(instance, first.run_id),
            90,
        )
        obs.network.shape("instr1", None)
        if comes_back == "after":
            worker.start()
        wait_for("the package", lambda: _completed(telescope, 1), 180)
        wait_for("every run to finish", lambda: _finished_runs(instance, 2), 120)
        runs = _runs(instance)
        [message] = _failure_messages(instance, first.run_id)
    assert noticed in message
    later = [r for r in runs if r.run_id != first.run_id]
    # Dagster's run retry, and perhaps the sensor's resume of the package once its heartbeat
    # went stale: whichever got the package built it, the other found nothing left to do.
    assert any(r.parent_run_id == first.run_id for r in later), later
    assert {r.status for r in later} == {dg.DagsterRunStatus.SUCCESS}
    _assert_one_intact_package(telescope)


def test_runs_queued_while_the_site_worker_is_down_wait_for_it(
    obs: Observatory, telescope: Telescope
) -> None:
    telescope.group(telescope.instr1, "a", files=1, size=8 * MB)
    telescope.group(telescope.instr2, "b", files=1, size=8 * MB)
    with _deployed(obs, telescope, worker_up=False) as (deployment, instance, worker):
        _start_sensors(deployment, "instr1_raw", "instr2_raw")

        def handed_to_the_broker() -> bool:
            runs = _runs(instance)
            return len(runs) == 2 and all(r.status == dg.DagsterRunStatus.STARTING for r in runs)

        wait_for("two runs waiting in the site's queue", handed_to_the_broker, 60)
        time.sleep(10)  # longer than a run takes: nobody else runs them
        assert handed_to_the_broker()
        assert packages_of(telescope.world) == []
        worker.start()
        runs = wait_for("the two runs", lambda: _finished_runs(instance, 2), 120)
    assert {r.status for r in runs} == {dg.DagsterRunStatus.SUCCESS}
    assert len(_completed(telescope, 2) or []) == 2


def test_a_broker_restart_loses_neither_the_worker_nor_the_launcher(
    obs: Observatory, telescope: Telescope
) -> None:
    with _deployed(obs, telescope) as (deployment, instance, _):
        obs.broker.stop()
        obs.broker.start()
        telescope.group(telescope.instr1, "a", files=1, size=8 * MB)
        _start_sensors(deployment, "instr1_raw")
        [run] = wait_for("the run", lambda: _finished_runs(instance, 1), 180)
    assert run.status == dg.DagsterRunStatus.SUCCESS
    _assert_one_intact_package(telescope)


def test_an_uplink_cut_mid_run_loses_nothing_and_doubles_nothing(
    obs: Observatory, telescope: Telescope
) -> None:
    telescope.group(telescope.instr1, "a", files=2, size=64 * MB)
    obs.network.shape("instr1", 160)
    with _deployed(obs, telescope) as (deployment, instance, _):
        _slow_package_in_flight(telescope, deployment)
        obs.network.set_uplink(False)
        time.sleep(15)  # shorter than the launcher's worker_silence_seconds (30 here)
        obs.network.set_uplink(True)
        obs.network.shape("instr1", None)
        wait_for("the package", lambda: _completed(telescope, 1), 240)
        [run] = wait_for("the run to finish", lambda: _finished_runs(instance, 1), 120)
        failures = _failure_messages(instance, run.run_id)
    # The one run rode the outage out: monitoring did not take the silent worker for dead.
    assert run.status == dg.DagsterRunStatus.SUCCESS
    assert failures == []
    _assert_one_intact_package(telescope)
