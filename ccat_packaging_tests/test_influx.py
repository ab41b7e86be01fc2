"""Package metrics in a real InfluxDB 1.x server (``influxdb_server``): what a completed and a
failed package write, that a server that is down, refuses or stalls never fails a package and
costs at most its bound, that the password stays out of every log, and that the Grafana
dashboard asks only for what the code writes."""

from __future__ import annotations

import json
import logging
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest
from sqlalchemy import select

from ccat_packaging import influx
from ccat_packaging.assembly import tar_agent
from ccat_packaging.assembly.archive import AssembledArchive
from ccat_packaging.definitions import defs
from ccat_packaging.errors import SourceFileError
from ccat_packaging.failure_policy import Verdict
from ccat_packaging.models import LocationType, RawDataPackage, Status
from ccat_packaging.plans import Endpoint, PackagePlan
from ccat_packaging_tests.dagster_helpers import run_partition
from ccat_packaging_tests.deployment import free_port
from ccat_packaging_tests.influxdb_server import InfluxServer

pytest_plugins = ["ccat_packaging_tests.influxdb_fixtures"]

DASHBOARD = Path(__file__).parents[1] / "docs" / "grafana" / "ccat-packaging.json"


def _group(world, write: bool = True) -> tuple[str, int]:
    """A group of three files at SOURCE ``src``; ``write=False`` files rows only (the files
    are missing, a permanent failure). Returns its key and its filed bytes."""
    site = world.site()
    src = world.location(site, "src", LocationType.SOURCE)
    world.location(site, "buf", LocationType.BUFFER)
    group = world.group(src)
    for i, size in enumerate([1000, 2000, 3000]):
        world.file(group, f"d/f{i}.dat", size=size, write=write)
    return f"src__eou{group.eou_id}__mod{group.module_id}", 6000


def _warnings(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    return [e.user_message for e in instance.all_logs(run_id) if e.level == logging.WARNING]


def _messages(instance: dg.DagsterInstance, run_id: str) -> str:
    return "\n".join(
        e.user_message + json.dumps(str(e.dagster_event)) for e in instance.all_logs(run_id)
    )


def test_tags_and_fields_survive_the_line_protocol(influxdb: InfluxServer, monkeypatch) -> None:
    influxdb.env(monkeypatch)
    odd = 'a b,c=d"e\\f ü'
    point = influx.Point(
        "packaging_package",
        {"source_location": odd, "outcome": "completed", "buffer_host": ""},
        {"package": odd, "files": 3, "bytes": 2**40, "seconds": 1.5, "ok": True},
        time_ns=1_700_000_000_123_456_789,
    )
    assert influx.write([point], pytest.fail)
    [row] = influxdb.query('SELECT * FROM "packaging_package"')
    assert row == {
        "measurement": "packaging_package",
        "time": 1_700_000_000_123_456_789,
        "source_location": odd,
        "outcome": "completed",
        "package": odd,
        "files": 3,
        "bytes": 2**40,
        "seconds": 1.5,
        "ok": True,
    }
    [[kind]] = [
        [r["fieldType"]] for r in influxdb.query("SHOW FIELD KEYS") if r["fieldKey"] == "files"
    ]
    assert kind == "integer"


def test_a_completed_package_writes_its_numbers(world, influxdb: InfluxServer, monkeypatch) -> None:
    influxdb.env(monkeypatch)
    key, filed = _group(world)
    with dg.instance_for_test() as instance:
        result = run_partition(instance, key)
        assert result.success
        assert _warnings(instance, result.run_id) == []
        assert influxdb.password not in _messages(instance, result.run_id)
    with world.session() as s:
        package = s.scalars(select(RawDataPackage)).one()
        assert package.status == Status.COMPLETED
        name, size = package.name, package.size
    [row] = influxdb.query('SELECT * FROM "packaging_package"')
    assert set(row) - {"measurement", "time"} <= _schema("packaging_package")
    seconds = row.pop("seconds")
    throughput = row.pop("throughput_bytes_per_second")
    assert 0 < seconds < 60 and throughput == pytest.approx(size / seconds, rel=1e-9)
    assert size is not None and size > filed
    assert {k: v for k, v in row.items() if k != "time"} == {
        "measurement": "packaging_package",
        "package": name,
        "files": 3,
        "bytes": size,
        "outcome": "completed",
        "source_location": "src",
        "source_host": "localhost",
        "buffer_location": "buf",
        "buffer_host": "localhost",
    }
    assert abs(row["time"] / 1e9 - time.time()) < 120


def test_a_permanent_failure_writes_its_error_class(
    world, influxdb: InfluxServer, monkeypatch
) -> None:
    influxdb.env(monkeypatch)
    key, filed = _group(world, write=False)
    with dg.instance_for_test() as instance:
        assert not run_partition(instance, key).success
    with world.session() as s:
        package = s.scalars(select(RawDataPackage)).one()
        assert package.status == Status.FAILED
        name = package.name
    [row] = influxdb.query('SELECT * FROM "packaging_package"')
    assert set(row) - {"measurement", "time"} <= _schema("packaging_package")
    assert {k: v for k, v in row.items() if k != "time"} == {
        "measurement": "packaging_package",
        "package": name,
        "files": 3,
        "bytes": filed,
        "outcome": "failed",
        "error_class": "SourceFileError",
        "source_location": "src",
        "source_host": "localhost",
    }


@pytest.fixture
def stalled_server() -> Iterator[str]:
    """A server that accepts connections and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"


@pytest.mark.parametrize("kind", ["down", "refusing", "stalled"])
def test_a_server_that_fails_costs_one_bounded_warning_and_never_the_package(
    world, influxdb: InfluxServer, stalled_server: str, monkeypatch, caplog, kind: str
) -> None:
    influxdb.env(monkeypatch)
    secret = influxdb.password
    if kind == "down":
        url = f"http://127.0.0.1:{free_port()}"
    elif kind == "refusing":
        url = influxdb.url
        secret = "wrong-" + secret  # the server answers 401
        monkeypatch.setenv("CCAT_INFLUXDB_PASSWORD", secret)
    else:
        url = stalled_server
    monkeypatch.setenv("CCAT_INFLUXDB_URL", url)
    # A short bound where the server never answers, a generous one where it answers at once
    # (however loaded the machine is).
    bound = 1 if kind == "stalled" else 10
    monkeypatch.setenv("CCAT_INFLUXDB_TIMEOUT_SECONDS", str(bound))
    seen: list[str] = []
    started = time.monotonic()
    assert not influx.write([influx.Point("m", {}, {"x": 1})], seen.append)
    assert time.monotonic() - started < bound + 1
    port = url.rsplit(":", 1)[1]
    expected = {
        "down": "ConnectionRefusedError",
        "refusing": 'HTTP 401 {"error":"authorization failed"}',
        "stalled": "timed out",
    }[kind]
    [warning] = seen
    assert f"http://127.0.0.1:{port}/write?db=ccat_test&precision=ns" in warning
    assert expected in warning and secret not in warning

    key, _ = _group(world)
    caplog.set_level(logging.DEBUG)
    with dg.instance_for_test() as instance:
        result = run_partition(instance, key)
        assert result.success
        [warning] = _warnings(instance, result.run_id)
        logged = _messages(instance, result.run_id)
    assert warning.startswith("InfluxDB: 1 point(s) not written to http://127.0.0.1:")
    assert expected in warning
    assert secret not in logged and secret not in caplog.text
    with world.session() as s:
        assert s.scalars(select(RawDataPackage.status)).one() == Status.COMPLETED
    assert influxdb.query('SELECT * FROM "packaging_package"') == []


def test_nothing_is_sent_without_a_url(monkeypatch) -> None:
    monkeypatch.delenv("CCAT_INFLUXDB_URL", raising=False)
    assert not influx.write([influx.Point("m", {}, {"x": 1})], pytest.fail)


def test_a_url_with_credentials_is_refused_without_showing_them(monkeypatch) -> None:
    monkeypatch.setenv("CCAT_INFLUXDB_URL", "http://admin:hunter2@db:8086")
    seen: list[str] = []
    assert not influx.write([influx.Point("m", {}, {"x": 1})], seen.append)
    assert seen == [
        "InfluxDB metrics not written: CCAT_INFLUXDB_URL must not hold credentials: set "
        "CCAT_INFLUXDB_USERNAME and CCAT_INFLUXDB_PASSWORD"
    ]


def test_the_config_repr_hides_the_password(monkeypatch) -> None:
    monkeypatch.setenv("CCAT_INFLUXDB_URL", "http://db:8086/")
    monkeypatch.setenv("CCAT_INFLUXDB_PASSWORD", "hunter2")
    config = influx.InfluxConfig.from_env()
    assert config is not None and "hunter2" not in repr(config)
    assert config.write_url() == "http://db:8086/write?db=ccat_packaging&precision=ns"


def _schema(measurement: str) -> set[str]:
    entry = influx.SCHEMA[measurement]
    return set(entry.tags | entry.fields)


def _queries(dashboard: dict) -> list[str]:
    """Every InfluxQL query of the dashboard: its panels' and its variables'."""
    panels = list(dashboard["panels"])
    for panel in dashboard["panels"]:
        panels.extend(panel.get("panels", []))
    variables = [v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return [t["query"] for p in panels for t in p.get("targets", [])] + variables


def _as_grafana_sends(query: str) -> str:
    """A query with Grafana's macros expanded as it would for the last day, all locations."""
    return (
        query.replace("$timeFilter", "time > now() - 1d")
        .replace("$__interval", "5m")
        .replace("/^$location$/", "/^(.*)$/")
    )


def test_the_grafana_dashboard_queries_only_what_the_code_writes(
    world, influxdb: InfluxServer, monkeypatch
) -> None:
    """Each query names only measurements, tags and fields of ``SCHEMA``, every measurement
    has a panel, and each query, run on points the code wrote, finds data."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = _queries(dashboard)
    assert len(queries) >= 10
    used: dict[str, set[str]] = {}
    for query in queries:
        [measurement] = re.findall(r'FROM "([^"]+)"', query)
        assert measurement in influx.SCHEMA, query
        names = set(re.findall(r'"([^"]+)"', query)) - {measurement}
        assert names, query
        assert names <= _schema(measurement), (query, names - _schema(measurement))
        used.setdefault(measurement, set()).update(names)
    assert set(used) == set(influx.SCHEMA)

    influxdb.env(monkeypatch)
    _group(world)
    with dg.instance_for_test() as instance:  # the backlog and buffer points, for real
        assert (
            defs().resolve_job_def("record_backlog").execute_in_process(instance=instance).success
        )
    # The package points as jobs.py and op_failures.py write them (tested for real above).
    source = Endpoint(1, "src", "localhost", None, 22, "/src")
    buffer = Endpoint(2, "buf", "localhost", None, 22, "/buf")
    plan = PackagePlan(1, "p1", "g", 1, "p1.tar", source, 1, (("a", 10),))
    identity = tar_agent.FileIdentity(dev=1, ino=1, size=10240, mtime_ns=0, ctime_ns=0)
    built = AssembledArchive("/buf/.p1", identity, 10240, "00", "sha256", False, 0.5, buffer)
    verdict = Verdict(SourceFileError("gone"), 1, False, 0.0, "SourceFileError: gone")
    assert influx.write(
        [influx.completed_point(plan, built), influx.failed_point(plan, verdict)], pytest.fail
    )
    for query in queries:
        assert influxdb.query(_as_grafana_sends(query)), query
