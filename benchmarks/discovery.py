"""Discovery at scale: one location's sensor over a season's worth of filed files.

A scratch PostgreSQL operations database gets ``files`` filed files at one SOURCE location, in
groups of ``files_per_group``; all but ``unpackaged_groups`` groups are packaged (a completed
package each). The real sensor of the code location is then evaluated, in a child process so
its memory is its own:

- the first tick (no cursor: a full scan, as every ``CCAT_SENSOR_RESCAN_SECONDS``);
- the following tick, with the cursor the first one returned (the backlog's next page);
- a tick when nothing changed (every group already requested);
- a tick after one new file was filed.

Each is timed three times (median; the database is warm, as it is for a sensor that ticks every
minute). Every statement a tick runs is then explained (EXPLAIN ANALYZE) to show that the
plans use indexes.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
import tracemalloc
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

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

LOCATION = "telescope"
SENSOR = f"package_{LOCATION}_sensor"
SEASON_START = datetime(2026, 1, 1, tzinfo=UTC)


@dataclass
class Sizes:
    files: int = 1_000_000
    files_per_group: int = 20
    unpackaged_groups: int = 10_000
    modules: int = 5

    @classmethod
    def quick(cls) -> Sizes:
        return cls(20_000, 20, 200, 5)

    @property
    def groups(self) -> int:
        return self.files // self.files_per_group

    @property
    def packaged_groups(self) -> int:
        return self.groups - self.unpackaged_groups


def populate(url: str, dsn: str, sizes: Sizes) -> float:
    """The schema from the models, then the rows, generated in the server (seconds taken)."""
    from sqlalchemy import create_engine

    from ccat_packaging.models import Base

    started = time.perf_counter()
    engine = create_engine(url)
    Base.metadata.create_all(engine)
    engine.dispose()
    eous = sizes.groups // sizes.modules + 1
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(
            "INSERT INTO site (id, name, short_name, location) VALUES (1, 'CCAT', 'ccat', '')"
        )
        for location_id, name, kind in ((1, LOCATION, "source"), (2, "buffer", "buffer")):
            cur.execute(
                "INSERT INTO data_location (id, name, site_id, location_type, storage_type, active,"
                " priority) VALUES (%s, %s, 1, %s, 'disk', true, 1)",
                (location_id, name, kind),
            )
            cur.execute(
                "INSERT INTO disk_data_location (id, host, path, port) VALUES (%s, 'localhost',"
                " %s, 22)",
                (location_id, f"/nonexistent/{name}"),
            )
        cur.execute("INSERT INTO instrument (id, name) VALUES (1, 'Prime-Cam')")
        cur.execute(
            "INSERT INTO instrument_module (id, instrument_id, name)"
            " SELECT m, 1, 'module ' || m FROM generate_series(1, %s) m",
            (sizes.modules,),
        )
        cur.execute(
            "INSERT INTO executed_obs_unit (id, name) SELECT e, 'scan ' || e"
            " FROM generate_series(1, %s) e",
            (eous,),
        )
        # Group g: executed obs unit g / modules + 1, module g % modules + 1, its files filed a
        # minute after the previous group's. The oldest groups are packaged.
        group = f"(n / {sizes.files_per_group})"
        eou = f"({group} / {sizes.modules} + 1)"
        module = f"(mod({group}, {sizes.modules}) + 1)"
        cur.execute(
            "INSERT INTO raw_data_package (id, name, relative_path, size, checksum,"
            " checksum_algorithm, status, retry_count, source_location_id, executed_obs_unit_id,"
            " instrument_module_id, part, created_at, updated_at)"
            f" SELECT n + 1, 'telescope__eou' || (n / {sizes.modules} + 1) || '__mod'"
            f" || (mod(n, {sizes.modules}) + 1) || '__part001', 'p/' || n || '.tar', 1000000,"
            " md5(n::text), 'sha256', 'completed', 0,"
            f" 1, (n / {sizes.modules} + 1), (mod(n, {sizes.modules}) + 1), 1, %s, %s"
            " FROM generate_series(0, %s) n",
            (SEASON_START, SEASON_START, sizes.packaged_groups - 1),
        )
        for table in (
            "site",
            "data_location",
            "instrument",
            "instrument_module",
            "executed_obs_unit",
            "raw_data_package",
        ):
            cur.execute(
                f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), max(id)) FROM {table}"
            )
        cur.execute(
            "INSERT INTO raw_data_file (id, name, relative_path, size, checksum,"
            " checksum_algorithm, file_type, source_location_id, executed_obs_unit_id,"
            " instrument_module_id, raw_data_package_id, created_at)"
            f" SELECT gen_random_uuid(), 'f' || n || '.fits', 'eou' || {eou} || '/mod' || {module}"
            f" || '/f' || n || '.fits', 50000 + mod(n, 1000), md5(n::text) || md5((n + 1)::text),"
            f" 'sha256', 'fits', 1, {eou}, {module},"
            f" CASE WHEN {group} < %s THEN {group} + 1 END,"
            f" %s + make_interval(secs => {group} * 60 + mod(n, {sizes.files_per_group}))"
            " FROM generate_series(0, %s) n",
            (sizes.packaged_groups, SEASON_START, sizes.files - 1),
        )
    conn = psycopg2.connect(dsn)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("VACUUM ANALYZE")  # what autovacuum does for a table this busy
    finally:
        conn.close()
    return time.perf_counter() - started


def _status_kib(key: str) -> int:
    for line in open("/proc/self/status"):  # noqa: SIM115
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def child(url: str, dsn: str) -> dict[str, Any]:
    """Runs in its own process: the ticks, their memory, and the statements they ran."""
    os.environ["CCAT_OPS_DB_URL"] = url
    import dagster as dg
    from sqlalchemy import Engine, event

    from ccat_packaging.definitions import defs
    from ccat_packaging.discovery import SensorCursor, plan_tick
    from ccat_packaging.resources import OpsDatabase

    statements: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        statements.append((statement, parameters))

    event.listen(Engine, "before_cursor_execute", capture)
    sensor = defs().resolve_sensor_def(SENSOR)
    ops_db = OpsDatabase()
    instance = dg.DagsterInstance.ephemeral()

    def tick(cursor: str | None) -> tuple[float, dg.SensorResult, int]:
        tracemalloc.start()
        started = time.perf_counter()
        with dg.build_sensor_context(
            instance=instance, cursor=cursor, resources={"ops_db": ops_db}
        ) as context:
            result = sensor(context)
        seconds = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert isinstance(result, dg.SensorResult)
        return seconds, result, peak

    out: dict[str, Any] = {"rss_before_kib": _status_kib("VmRSS")}
    tick(None)  # connections, imports and caches, as a running code server has them

    def timed(name: str, cursor: str | None, expect: int | None) -> dg.SensorResult:
        runs = [tick(cursor) for _ in range(3)]
        result = runs[-1][1]
        requests = len(result.run_requests or [])
        if expect is not None and requests != expect:
            raise RuntimeError(f"{name}: {requests} run requests, {expect} expected")
        out[name] = {
            "seconds": statistics.median(r[0] for r in runs),
            "python_peak_bytes": max(r[2] for r in runs),
            "requests": requests,
            "statements": [],
        }
        statements.clear()
        tick(cursor)
        out[name]["statements"] = [
            (s, p) for s, p in statements if "raw_data_file" in s or "raw_data_package" in s
        ]
        return result

    first = timed("first tick (no cursor)", None, None)
    timed("following tick (cursor of the first)", first.cursor, None)
    with ops_db.session() as session:  # the cursor once every group has been requested
        drained = plan_tick(
            session, 1, SensorCursor(), now=time.time(), limit=10**7, rescan_seconds=10**6
        ).cursor
    timed("tick when nothing changed", drained.serialize(), 0)
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("INSERT INTO executed_obs_unit (name) VALUES ('late scan') RETURNING id")
        row = cur.fetchone()
        assert row is not None
        cur.execute(
            "INSERT INTO raw_data_file (id, name, relative_path, size, file_type,"
            " source_location_id, executed_obs_unit_id, instrument_module_id, created_at)"
            " VALUES (gen_random_uuid(), 'late.fits', 'late/late.fits', 1, 'fits', 1, %s, 1,"
            " now())",
            (row[0],),
        )
    timed("tick after one new file", drained.serialize(), 1)
    out["rss_peak_kib"] = _status_kib("VmHWM")
    return out


def explain(dsn: str, statement: str, parameters: Any) -> str:
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + statement, parameters)
        plan = "\n".join(row[0] for row in cur.fetchall())
        conn.rollback()
    return plan


def run(sizes: Sizes | None = None) -> Section:
    sizes = sizes or Sizes()
    section = Section("Discovery at scale")
    started = time.perf_counter()
    with scratch_database("ops") as name:
        url = database_url(name)
        dsn = PG_DSN.replace("dbname=postgres", f"dbname={name}")
        groups = sizes.unpackaged_groups
        log(f"discovery: filing {sizes.files:,} files ({groups:,} groups unpackaged)")
        load_seconds = populate(url, dsn, sizes)
        log(f"discovery: loaded in {load_seconds:.0f} s; ticking")
        out = subprocess.run(
            [sys.executable, "-m", "benchmarks.discovery", "child", url, dsn],
            check=False,
            capture_output=True,
            text=True,
            cwd=REPO,
        )
        if out.returncode != 0:
            raise RuntimeError(f"the sensor ticks failed:\n{out.stderr[-3000:]}")
        result = json.loads(out.stdout.splitlines()[-1])
        label = (
            f"discovery: {sizes.files:,} files at one location, "
            f"{sizes.unpackaged_groups:,} groups unpackaged"
        )
        targets = {
            "first tick (no cursor)": 2.0,
            "following tick (cursor of the first)": None,
            "tick when nothing changed": 0.2,
            "tick after one new file": 0.2,
        }
        plans: list[str] = []
        shown: set[str] = set()
        all_indexed = True
        for name_, target in targets.items():
            tick = result[name_]
            section.rows.append(
                Row(
                    label,
                    f"sensor {name_}",
                    tick["seconds"],
                    "s",
                    target=target,
                    at_most=True,
                    note=f"{tick['requests']} run request(s); Python allocations peaked at "
                    f"{tick['python_peak_bytes'] / 1e6:.1f} MB",
                )
            )
            for statement, parameters in tick["statements"]:
                plan = explain(dsn, statement, parameters)
                indexed = "Seq Scan on raw_data_file" not in plan and (
                    "Seq Scan on raw_data_package" not in plan
                )
                all_indexed &= indexed
                if statement in shown and "raw_data_file" not in statement:
                    continue  # the same packages query every tick: once is enough
                shown.add(statement)
                plans.append(f"{name_}:\n\n```sql\n{statement}\n```\n\n```\n{plan}\n```")
        peak = result["rss_peak_kib"] / 1024
        section.rows.append(
            Row(
                label,
                "peak RSS of the process that ran every tick",
                peak,
                "MB",
                note=f"{result['rss_before_kib'] / 1024:.0f} MB before the first tick "
                "(Dagster and the code location loaded)",
            )
        )
        section.rows.append(
            Row(
                label,
                "every raw_data_file / raw_data_package access uses an index",
                1.0 if all_indexed else 0.0,
                "(1 = yes)",
                target=1.0,
            )
        )
        section.rows.append(Row(label, "generating and loading the rows", load_seconds, "s"))
        section.details.append(
            "### Query plans of the sensor ticks (EXPLAIN ANALYZE, latest run)\n\n"
            + "\n\n".join(plans)
        )
    section.seconds = time.perf_counter() - started
    return section


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "child":
    print(json.dumps(child(sys.argv[2], sys.argv[3]), default=str))
