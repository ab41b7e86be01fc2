"""Orchestration overhead: packages per minute end to end, through the Dagster daemon.

A scratch PostgreSQL operations database and a scratch PostgreSQL Dagster instance configured
by the repository's production ``dagster.yaml`` (copied unchanged into a scratch DAGSTER_HOME);
``dagster-daemon run -w workspace.yaml`` loads the code location as production does. One SOURCE
location on this machine holds ``groups`` tiny groups (2 files of 4 KiB each), so what is
measured is the cost of orchestrating a package, not of assembling it: the sensor requests the
runs, the queue launches them (each a new run-worker process, ``in_process_executor``), and each
run claims, assembles, verifies and registers its package. Measured from the first run's
creation to the last run's end, from the Dagster instance's own run records.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg2

from benchmarks.common import (
    PG_DSN,
    REPO,
    Row,
    Section,
    database_url,
    log,
    scratch_database,
)

LOCATION = "bench"
SENSOR = f"package_{LOCATION}_sensor"
FILES_PER_GROUP = 2
FILE_SIZE = 4096
GROUPS = 48
TIMEOUT = 420


def populate(url: str, root: Path, groups: int) -> None:
    from ccat_packaging.db import make_engine, session_scope
    from ccat_packaging.models import (
        Base,
        DiskDataLocation,
        ExecutedObsUnit,
        Instrument,
        InstrumentModule,
        LocationType,
        RawDataFile,
        Site,
        StorageType,
    )

    engine = make_engine(url)
    Base.metadata.create_all(engine)
    (root / "source").mkdir(parents=True)
    (root / "buffer").mkdir()
    with session_scope(engine) as session:
        site = Site(name="CCAT", short_name="ccat", location="")
        session.add(site)
        session.flush()
        for name, kind in ((LOCATION, LocationType.SOURCE), ("buffer", LocationType.BUFFER)):
            session.add(
                DiskDataLocation(
                    name=name,
                    site_id=site.id,
                    location_type=kind,
                    storage_type=StorageType.DISK,
                    host="localhost",
                    path=str(root / ("source" if kind == LocationType.SOURCE else "buffer")),
                )
            )
        instrument = Instrument(name="Prime-Cam")
        session.add(instrument)
        session.flush()
        module = InstrumentModule(instrument_id=instrument.id, name="m280")
        session.add(module)
        session.flush()
        source_id = session.query(DiskDataLocation).filter_by(name=LOCATION).one().id
        for g in range(groups):
            eou = ExecutedObsUnit(name=f"scan {g}")
            session.add(eou)
            session.flush()
            for f in range(FILES_PER_GROUP):
                relative = f"eou{eou.id}/f{f}.dat"
                (root / "source" / relative).parent.mkdir(exist_ok=True)
                (root / "source" / relative).write_bytes(os.urandom(FILE_SIZE))
                session.add(
                    RawDataFile(
                        name=f"f{f}.dat",
                        relative_path=relative,
                        size=FILE_SIZE,
                        file_type="dat",
                        source_location_id=source_id,
                        executed_obs_unit_id=eou.id,
                        instrument_module_id=module.id,
                    )
                )
    engine.dispose()


def _completed(dsn: str) -> int:
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM raw_data_package WHERE status = 'completed'")
        row = cur.fetchone()
    conn.close()
    return int(row[0]) if row else 0


def _run_records(dsn: str) -> tuple[int, int, float, float, float, float]:
    """(runs, successful, first created, last ended, mean queued, mean running) in seconds."""
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT count(*), count(*) FILTER (WHERE status = 'SUCCESS'),"
            " min(extract(epoch FROM create_timestamp AT TIME ZONE 'UTC')), max(end_time),"
            " avg(start_time - extract(epoch FROM create_timestamp AT TIME ZONE 'UTC')),"
            " avg(end_time - start_time) FROM runs"
        )
        row = cur.fetchone()
    conn.close()
    assert row is not None
    return int(row[0]), int(row[1]), *(float(v or 0) for v in row[2:])  # type: ignore[return-value]


def _stop(process: subprocess.Popen[bytes]) -> None:
    """The daemon leads its own process group: its code server and run workers are in it."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(30)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def run(scratch: Path, groups: int | None = None) -> Section:
    groups = groups or GROUPS
    section = Section("Orchestration overhead")
    started = time.perf_counter()
    bin_dir = Path(sys.executable).parent
    scratch.mkdir(parents=True)
    with scratch_database("ops") as ops, scratch_database("dagster") as instance_db:
        ops_url = database_url(ops)
        ops_dsn = PG_DSN.replace("dbname=postgres", f"dbname={ops}")
        instance_dsn = PG_DSN.replace("dbname=postgres", f"dbname={instance_db}")
        populate(ops_url, scratch, groups)
        home = scratch / "dagster_home"
        home.mkdir()
        shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
        env = {
            **os.environ,
            "DAGSTER_HOME": str(home),
            "DAGSTER_PG_USER": "postgres",
            "DAGSTER_PG_PASSWORD": "",
            "DAGSTER_PG_HOST": "127.0.0.1",
            "DAGSTER_PG_PORT": "5432",
            "DAGSTER_PG_DB": instance_db,
            "CCAT_OPS_DB_URL": ops_url,
            "CCAT_SENSOR_INTERVAL_SECONDS": "5",
        }
        log(f"orchestration: {groups} groups; starting the sensor and the daemon")
        subprocess.run(
            [str(bin_dir / "dagster"), "sensor", "start", SENSOR, "-w", "workspace.yaml"],
            check=True,
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
        )
        with open(scratch / "daemon.log", "wb") as daemon_log:
            daemon = subprocess.Popen(
                [str(bin_dir / "dagster-daemon"), "run", "-w", "workspace.yaml"],
                cwd=REPO,
                env=env,
                stdout=daemon_log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            deadline = time.monotonic() + TIMEOUT
            done = 0
            while done < groups:
                if daemon.poll() is not None:
                    raise RuntimeError("dagster-daemon exited: " + _tail(scratch / "daemon.log"))
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"only {done} of {groups} packages completed in {TIMEOUT} s: "
                        + _tail(scratch / "daemon.log")
                    )
                time.sleep(2)
                done = _completed(ops_dsn)
            time.sleep(3)  # the last run's end is written after its package completes
        finally:
            _stop(daemon)
        runs, succeeded, first, last, queued, running = _run_records(instance_dsn)
    label = f"orchestration: {groups} tiny groups, daemon + production dagster.yaml"
    per_minute = succeeded / max(last - first, 1e-9) * 60
    section.rows.append(
        Row(
            label,
            "packages per minute (first run created -> last run ended)",
            per_minute,
            "/min",
            note=f"{succeeded} of {runs} runs succeeded in {last - first:.0f} s",
        )
    )
    section.rows.append(Row(label, "mean time a run waited in the queue", queued, "s"))
    section.rows.append(
        Row(label, "mean run duration (run worker started -> run ended)", running, "s")
    )
    section.seconds = time.perf_counter() - started
    return section


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-3000:]
