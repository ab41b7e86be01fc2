"""The embedded default, end to end, driven the way production is.

A SQLite operations database and real files on this machine; a Dagster instance in
``<root>/dagster_home`` whose dagster.yaml is the repository's production one less its
PostgreSQL storage (``write_instance``: same run queue, run and pool limits, telemetry and
sign-up dialog off). The demo turns the location sensors on with ``dagster sensor start``, runs
``dagster-daemon`` until every filed file is in a finished package, stops it, and prints a table
of what was packaged. So ``make ui`` (``serve_ui``) on the same instance shows the sensors'
ticks, the runs with their code location and every group's partition as packaged.

Everything lives under ``.ccat/demo`` in the working directory. Running it again packages only
what is new (nothing, unless files were added) and does not start the daemon when nothing is.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import dagster as dg
import yaml
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from ccat_packaging import names, settings
from ccat_packaging.cli import _size as human_size  # the one size format of the CLI
from ccat_packaging.db import make_engine, session_scope
from ccat_packaging.discovery import source_locations
from ccat_packaging.models import (
    Base,
    DiskDataLocation,
    ExecutedObsUnit,
    Instrument,
    InstrumentModule,
    LocationType,
    RawDataFile,
    RawDataFilePhysicalCopy,
    RawDataPackage,
    RawDataPackagePhysicalCopy,
    Site,
    Status,
    StorageType,
)
from ccat_packaging.processes import start_group, stop_groups

REPO = Path(__file__).resolve().parent.parent
PRODUCTION_INSTANCE = REPO / "dagster.yaml"
WORKSPACE = REPO / "workspace.yaml"
# Dagster's commands of this interpreter's environment (the project's .venv/bin).
DAGSTER_BIN = Path(sys.executable).parent
# The demo's daemon ticks each location sensor as often as Dagster's sensor loop allows.
DEMO_SENSOR_INTERVAL_SECONDS = 1
# Bounds: packaging ~1.3 GB on a slow laptop, turning the sensors on, an orderly shutdown,
# and a run of another job (a schedule's) that is in progress when packaging is done.
WAIT_SECONDS = 900
START_SENSORS_SECONDS = 180
STOP_GRACE_SECONDS = 30
OTHER_RUNS_GRACE_SECONDS = 60
RUNNING = [
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]
FINISHED_BADLY = [dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED]
FINISHED = [dg.DagsterRunStatus.SUCCESS, *FINISHED_BADLY]

MB = 1_000_000


@dataclass(frozen=True)
class DemoPaths:
    root: Path

    @property
    def ops_db_url(self) -> str:
        return f"sqlite:///{self.root / 'ops_db.sqlite'}"

    @property
    def dagster_home(self) -> Path:
        return self.root / "dagster_home"

    @property
    def instruments(self) -> Path:
        return self.root / "instruments"

    @property
    def buffers(self) -> Path:
        return self.root / "buffers"

    @property
    def daemon_log(self) -> Path:
        return self.root / "daemon.log"


# (instrument, its SOURCE location, modules, files per group)
INSTRUMENTS = [
    ("Prime-Cam", "primecam_raw_data", ["mod280", "mod350", "mod850"], 9),
    ("CHAI", "chai_raw_data", ["LFA", "HFA"], 12),
]


def _file_size(rng: random.Random, scale: float) -> int:
    roll = rng.random()
    if roll < 0.70:
        low, high = 1 * MB, 5 * MB
    elif roll < 0.95:
        low, high = 5 * MB, 15 * MB
    else:
        low, high = 15 * MB, 30 * MB
    return int(rng.randint(low, high) * scale)


def _write_file(path: Path, size: int, rng: random.Random) -> str:
    """Incompressible content, like raw detector data; returns its sha256 for filing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with open(path, "wb") as handle:
        left = size
        while left:
            chunk = rng.randbytes(min(left, 4 * MB))
            digest.update(chunk)
            handle.write(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def seed(
    session: Session, paths: DemoPaths, size_scale: float, obs_units: int, seed_value: int = 2026
) -> int:
    """File a site, two SOURCE and two BUFFER locations, and per instrument ``obs_units``
    executed obs units of real files (a few hundred files in all for 4)."""
    rng = random.Random(seed_value)
    host = "localhost"
    site = Site(name="CCAT Observatory", short_name="ccat", location="Cerro Chajnantor")
    session.add(site)
    for name, priority in (("ccat_buffer", 1), ("ccat_buffer_spare", 2)):
        root = paths.buffers / name
        root.mkdir(parents=True, exist_ok=True)
        session.add(
            DiskDataLocation(
                name=name,
                site=site,
                location_type=LocationType.BUFFER,
                storage_type=StorageType.DISK,
                priority=priority,
                host=host,
                path=str(root),
            )
        )
    files = 0
    eou_number = 0
    for instrument_name, location_name, module_names, per_group in INSTRUMENTS:
        root = paths.instruments / location_name
        root.mkdir(parents=True, exist_ok=True)
        location = DiskDataLocation(
            name=location_name,
            site=site,
            location_type=LocationType.SOURCE,
            storage_type=StorageType.DISK,
            host=host,
            path=str(root),
        )
        instrument = Instrument(name=instrument_name)
        modules = [InstrumentModule(name=m, instrument=instrument) for m in module_names]
        session.add_all([location, instrument, *modules])
        for _ in range(obs_units):
            eou_number += 1
            eou = ExecutedObsUnit(name=f"{instrument_name} scan {eou_number:04d}")
            session.add(eou)
            session.flush()
            for module in modules:
                for index in range(per_group):
                    subdir = f"scan_{index // 4:02d}"
                    relative = f"{module.name}/eou{eou.id:04d}/{subdir}/frame_{index:03d}.fits"
                    size = _file_size(rng, size_scale)
                    checksum = _write_file(root / relative, size, rng)
                    raw = RawDataFile(
                        name=Path(relative).name,
                        relative_path=relative,
                        size=size,
                        checksum=checksum,
                        checksum_algorithm="sha256",
                        file_type="fits",
                        source_location_id=location.id,
                        executed_obs_unit_id=eou.id,
                        instrument_module_id=module.id,
                    )
                    session.add(raw)
                    session.flush()
                    session.add(
                        RawDataFilePhysicalCopy(
                            raw_data_file_id=raw.id, data_location_id=location.id
                        )
                    )
                    files += 1
    return files


def instance_config(production: Path = PRODUCTION_INSTANCE) -> dict[str, Any]:
    """The production instance less its ``storage``: Dagster then keeps runs, events and
    schedules in SQLite files in DAGSTER_HOME. Every other section (run queue, run and pool
    limits, monitoring, retries, tick retention, telemetry and sign-up dialog off) needs no
    server, so it is taken as it is and cannot drift from production."""
    config = yaml.safe_load(production.read_text())
    return {key: value for key, value in config.items() if key != "storage"}


def write_instance(home: Path) -> Path:
    """Write the demo instance's dagster.yaml, anew each time (production may have changed)."""
    home.mkdir(parents=True, exist_ok=True)
    target = home / "dagster.yaml"
    target.write_text(
        f"# Written by `ccat-packaging demo` from {PRODUCTION_INSTANCE} (all but storage);\n"
        "# it is rewritten on every run: change that file instead.\n"
        + yaml.safe_dump(instance_config(), sort_keys=False)
    )
    return target


def dagster_env(paths: DemoPaths, **settings_env: str) -> dict[str, str]:
    """The environment of a Dagster process on the demo's instance and database."""
    return {
        **os.environ,
        "DAGSTER_HOME": str(paths.dagster_home),
        settings.OPS_DB_URL_ENV: paths.ops_db_url,
        **settings_env,
    }


def start_sensors(env: dict[str, str], log: Path) -> None:
    """``dagster sensor start --start-all``, as an operator turns the sensors on: their state
    is kept in the instance, so the UI shows them running and ticking afterwards."""
    argv = [str(DAGSTER_BIN / "dagster"), "sensor", "start", "--start-all", "-w", str(WORKSPACE)]
    with open(log, "ab") as out:
        process = start_group(argv, env, REPO, out)
    with stopped_on_exit([process]):  # with the code server it starts
        try:
            code = process.wait(timeout=START_SENSORS_SECONDS)
        except subprocess.TimeoutExpired:
            raise DemoError(f"`dagster sensor start` took over {START_SENSORS_SECONDS} s") from None
    if code != 0:
        raise DemoError(f"`dagster sensor start --start-all` failed; see {log}")


class DemoError(Exception):
    """Stops the demo with one line."""


@contextlib.contextmanager
def stopped_on_exit(processes: list[subprocess.Popen[bytes]]) -> Iterator[None]:
    """The groups of ``processes`` (also those added to it inside the block) are stopped
    however the block ends: done, an error, Ctrl-C or SIGTERM (turned into an exception here
    so that this runs)."""

    def terminated(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    finally:
        # A second Ctrl-C must not cut the stopping short and leave the groups running.
        interrupt = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            stop_groups(processes, grace=STOP_GRACE_SECONDS)
        finally:
            signal.signal(signal.SIGINT, interrupt)
            signal.signal(signal.SIGTERM, previous)


@dataclass(frozen=True)
class Progress:
    files: int
    finished_files: int
    queued: int
    in_progress: int

    @property
    def done(self) -> bool:
        return self.finished_files == self.files and not self.queued and not self.in_progress

    def __str__(self) -> str:
        return (
            f"{self.finished_files}/{self.files} files in finished packages, "
            f"{self.in_progress} run(s) in progress, {self.queued} queued"
        )


def _progress(
    session: Session, instance: dg.DagsterInstance, jobs: list[str], since: datetime
) -> Progress:
    """Files in completed or failed packages (the sensors request nothing more for them), and
    the packaging jobs' runs still to finish: every queued one (a demo stopped by Ctrl-C
    leaves its queued runs to the next), and those running that changed ``since`` this demo
    began (a run worker killed with its daemon leaves a run that stays "started" and must
    not be waited for). Other jobs' runs (a schedule's) are not waited for."""
    finished = select(RawDataPackage.id).where(
        RawDataPackage.status.in_([Status.COMPLETED, Status.FAILED])
    )
    files = session.scalar(select(func.count(RawDataFile.id))) or 0
    done = session.scalar(
        select(func.count(RawDataFile.id)).where(RawDataFile.raw_data_package_id.in_(finished))
    )
    queued = in_progress = 0
    for job in jobs:
        queued += instance.get_runs_count(
            dg.RunsFilter(job_name=job, statuses=[dg.DagsterRunStatus.QUEUED])
        )
        in_progress += instance.get_runs_count(
            dg.RunsFilter(job_name=job, statuses=RUNNING, updated_after=since)
        )
    return Progress(files, done or 0, queued, in_progress)


def package_until_done(
    paths: DemoPaths,
    instance: dg.DagsterInstance,
    engine: Engine,
    jobs: list[str],
    since: datetime,
) -> None:
    """Run the daemon with the sensors on until every file is in a finished package and no
    packaging run is queued or in progress; a line whenever that changes."""
    env = dagster_env(paths, CCAT_SENSOR_INTERVAL_SECONDS=str(DEMO_SENSOR_INTERVAL_SECONDS))
    paths.daemon_log.write_bytes(b"")
    started = time.monotonic()
    with open(paths.daemon_log, "ab") as log:
        daemon = start_group(
            [str(DAGSTER_BIN / "dagster-daemon"), "run", "-w", str(WORKSPACE)], env, REPO, log
        )
    with stopped_on_exit([daemon]):
        print(f"dagster-daemon started (pid {daemon.pid}, log {paths.daemon_log})", flush=True)
        print("turning the sensors on: dagster sensor start --start-all", flush=True)
        start_sensors(env, paths.daemon_log)
        last: Progress | None = None
        printed = 0.0
        while True:
            if daemon.poll() is not None:
                raise DemoError(f"dagster-daemon exited with {daemon.returncode}; see the log")
            with session_scope(engine) as session:
                progress = _progress(session, instance, jobs, since)
            elapsed = time.monotonic() - started
            if progress != last or elapsed - printed >= 10:
                print(f"  {elapsed:5.0f} s  {progress}", flush=True)
                last, printed = progress, elapsed
            if progress.done:
                break
            if elapsed > WAIT_SECONDS:
                raise DemoError(f"not done after {WAIT_SECONDS} s: {progress}")
            time.sleep(1)
        # A run of another job in progress now (a schedule's) may finish, briefly, rather than
        # be cut off; queued ones stay queued for the next daemon (`make ui`).
        others = dg.RunsFilter(statuses=RUNNING, updated_after=since)
        deadline = time.monotonic() + OTHER_RUNS_GRACE_SECONDS
        while instance.get_runs_count(others) and time.monotonic() < deadline:
            time.sleep(1)
    print(f"dagster-daemon stopped after {time.monotonic() - started:.0f} s", flush=True)


def package_table(session: Session) -> list[tuple[str, int, int, str, str, str]]:
    """Per package: name, files, bytes, sha256, status and the buffer holding it."""
    rows = session.execute(
        select(RawDataPackage, func.count(RawDataFile.id), DiskDataLocation.name)
        .join(RawDataFile, RawDataFile.raw_data_package_id == RawDataPackage.id)
        .outerjoin(
            RawDataPackagePhysicalCopy,
            RawDataPackagePhysicalCopy.raw_data_package_id == RawDataPackage.id,
        )
        .outerjoin(
            DiskDataLocation, DiskDataLocation.id == RawDataPackagePhysicalCopy.data_location_id
        )
        .group_by(RawDataPackage.id, DiskDataLocation.name)
        .order_by(RawDataPackage.name)
    ).all()
    return [
        (
            package.name,
            int(count),
            package.size or 0,
            package.checksum or "-",
            package.status.value,
            buffer or "-",
        )
        for package, count, buffer in rows
    ]


def print_table(rows: list[tuple[str, int, int, str, str, str]], buffers: Path) -> None:
    """One line per package in 100 columns: the checksum's first 12 hex digits (the whole one
    is in ``ccat-packaging list`` and the UI), the size in decimal units, and the buffer; where
    the archive lies below it is said once."""
    header = ("package", "files", "size", "sha256", "status", "buffer")
    cells = [header] + [
        (name, str(files), human_size(size), digest[:12], status, buffer)
        for name, files, size, digest, status, buffer in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    right = {1, 2}
    for row in cells:
        line = "  ".join(
            v.rjust(w) if i in right else v.ljust(w)
            for i, (v, w) in enumerate(zip(row, widths, strict=True))
        )
        print(line.rstrip())
    print(f"archives: {buffers}/<buffer>/<location>/eou<id>/<package>.tar")


def run(root: Path, reset: bool = False, size_scale: float = 1.0, obs_units: int = 4) -> int:
    """Seed (first time only), package with the daemon what is not yet packaged, print the
    table; returns an exit code."""
    started = time.monotonic()
    paths = DemoPaths(root.resolve())
    if reset and paths.root.exists():
        shutil.rmtree(paths.root)
    paths.root.mkdir(parents=True, exist_ok=True)
    write_instance(paths.dagster_home)
    # The database the CLI's error messages name (the Dagster processes get it in their env).
    os.environ[settings.OPS_DB_URL_ENV] = paths.ops_db_url
    engine = make_engine(paths.ops_db_url)
    Base.metadata.create_all(engine)
    with session_scope(engine) as session:
        if session.scalar(select(func.count(Site.id))) == 0:
            filed = seed(session, paths, size_scale, obs_units)
            print(f"filed {filed} raw files under {paths.instruments}")
    seeded_at = time.monotonic()
    since = datetime.now(UTC)
    try:
        with dg.DagsterInstance.from_config(str(paths.dagster_home)) as instance:
            with session_scope(engine) as session:
                jobs = [names.job_name(loc.slug) for loc in source_locations(session)]
                progress = _progress(session, instance, jobs, since)
            if progress.done:
                print(
                    f"nothing to package ({progress.finished_files}/{progress.files} files in "
                    "finished packages): the daemon is not started"
                )
            else:
                package_until_done(paths, instance, engine, jobs, since)
            ran = [
                record.dagster_run
                for job in jobs
                for record in instance.get_run_records(
                    dg.RunsFilter(job_name=job, statuses=FINISHED, updated_after=since)
                )
            ]
    except DemoError as exc:
        print(f"error: {exc}")
        return 1
    except KeyboardInterrupt:
        print("interrupted: the daemon and its runs are stopped; `make demo` again resumes")
        return 130
    failed = [r for r in ran if r.status in FINISHED_BADLY]
    with session_scope(engine) as session:
        rows = package_table(session)
    engine.dispose()
    print_table(rows, paths.buffers)
    total = sum(r[2] for r in rows)
    print(
        f"\n{len(rows)} packages, {human_size(total)}; this demo ran {len(ran)} run(s), "
        f"{len(failed)} failed; seeding {seeded_at - started:.1f} s, packaging "
        f"{time.monotonic() - seeded_at:.1f} s, total {time.monotonic() - started:.1f} s"
    )
    for dagster_run in failed:
        print(f"FAILED: run {dagster_run.run_id} of {dagster_run.job_name} (see `make ui`)")
    print("`make ui` shows these runs, the sensors' ticks and every group's partition")
    return 1 if failed else 0


def serve_ui(root: Path, host: str, port: int) -> int:
    """``make ui``: dagster-daemon and dagster-webserver on the demo's instance and database,
    as production runs them (not ``dagster dev``, which Dagster 1.13 deprecates in favour of
    ``dg dev`` with a warning on every start); both stop on Ctrl-C."""
    paths = DemoPaths(root.resolve())
    if not (paths.root / "ops_db.sqlite").is_file():
        print(f"error: no demo at {paths.root}: run `make demo` first")
        return 1
    write_instance(paths.dagster_home)
    env = dagster_env(paths)
    commands = {
        "dagster-daemon": ["run", "-w", str(WORKSPACE)],
        "dagster-webserver": ["-w", str(WORKSPACE), "-h", host, "-p", str(port)],
    }
    processes: list[subprocess.Popen[bytes]] = []
    try:
        with stopped_on_exit(processes):
            for name, args in commands.items():
                processes.append(start_group([str(DAGSTER_BIN / name), *args], env, REPO))
            print(f"the demo's Dagster UI: http://{host}:{port} (Ctrl-C stops it)", flush=True)
            while all(p.poll() is None for p in processes):
                time.sleep(0.5)
    except KeyboardInterrupt:
        return 0
    for name, process in zip(commands, processes, strict=True):
        if process.returncode is not None:
            print(f"error: {name} exited with {process.returncode}")
    return 1
