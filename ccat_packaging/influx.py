"""Packaging metrics in InfluxDB, the observatory's monitoring store (Grafana reads them).

Off unless ``CCAT_INFLUXDB_URL`` is set. Points go to an InfluxDB 1.x server as line protocol
over HTTP (``POST /write?db=...&precision=ns``, the standard library's ``urllib``: one request
per batch needs no client library). Monitoring never decides the fate of a package or of the
backlog job: a write that fails (server down, refusing, slow past
``CCAT_INFLUXDB_TIMEOUT_SECONDS``, an error answer) is one warning naming the URL, and its
points are dropped; the caller waits at most that long in all. The password goes only into
the request's ``Authorization`` header: the URL may not carry credentials, so whatever names
it shows none.

What is written, ``SCHEMA`` lists (the Grafana dashboard in docs/grafana is checked against
it): tags are what panels group and filter by (few distinct values), fields what they plot.
"""

from __future__ import annotations

import base64
import http.client
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from ccat_packaging import settings
from ccat_packaging.assembly.archive import AssembledArchive
from ccat_packaging.failure_policy import Verdict
from ccat_packaging.operations import BufferSpace, LocationBacklog
from ccat_packaging.plans import PackagePlan

FieldValue = int | float | str | bool
Warn = Callable[[str], object]

BACKLOG = "packaging_backlog"
BUFFER = "packaging_buffer"
PACKAGE = "packaging_package"


@dataclass(frozen=True)
class Measurement:
    tags: frozenset[str]
    fields: frozenset[str]


SCHEMA: dict[str, Measurement] = {
    BACKLOG: Measurement(
        frozenset({"source_location"}),
        frozenset(
            {
                "unpackaged_files",
                "unpackaged_bytes",
                "oldest_unpackaged_age_seconds",
                "completed_last_hour",
                "failed_last_hour",
                "failed",
            }
        ),
    ),
    BUFFER: Measurement(
        frozenset({"buffer_location", "buffer_host"}), frozenset({"free_bytes", "total_bytes"})
    ),
    PACKAGE: Measurement(
        frozenset(
            {
                "source_location",
                "source_host",
                "buffer_location",
                "buffer_host",
                "outcome",
                "error_class",
            }
        ),
        frozenset({"package", "files", "bytes", "seconds", "throughput_bytes_per_second"}),
    ),
}


@dataclass(frozen=True)
class Point:
    measurement: str
    tags: Mapping[str, str]
    fields: Mapping[str, FieldValue]
    time_ns: int = field(default_factory=time.time_ns)


def backlog_point(row: LocationBacklog) -> Point:
    return Point(BACKLOG, {"source_location": row.location}, row.metrics())


def buffer_point(space: BufferSpace) -> Point | None:
    """None for a buffer whose free space is not known (its problem is reported elsewhere)."""
    if space.free is None or space.total is None:
        return None
    return Point(
        BUFFER,
        {"buffer_location": space.location, "buffer_host": space.host},
        {"free_bytes": space.free, "total_bytes": space.total},
    )


def completed_point(plan: PackagePlan, archive: AssembledArchive) -> Point:
    return Point(
        PACKAGE,
        {
            "source_location": plan.source.location_name,
            "source_host": plan.source.host,
            "buffer_location": archive.buffer.location_name,
            "buffer_host": archive.buffer.host,
            "outcome": "completed",
        },
        {
            "package": plan.name,
            "files": len(plan.members),
            "bytes": archive.size,
            "seconds": archive.seconds,
            "throughput_bytes_per_second": archive.size / max(archive.seconds, 1e-9),
        },
    )


def failed_point(plan: PackagePlan, verdict: Verdict) -> Point:
    """A permanent failure: no buffer took the package, and its time is not a throughput."""
    return Point(
        PACKAGE,
        {
            "source_location": plan.source.location_name,
            "source_host": plan.source.host,
            "outcome": "failed",
            "error_class": type(verdict.error).__name__,
        },
        {"package": plan.name, "files": len(plan.members), "bytes": plan.total_bytes},
    )


def record_completed(plan: PackagePlan, archive: AssembledArchive, warn: Warn) -> None:
    """At a package's completion (``jobs.register_at_buffer``)."""
    write([completed_point(plan, archive)], warn)


def record_failed(plan: PackagePlan, verdict: Verdict, warn: Warn) -> None:
    """At a package's permanent failure (``op_failures.handled``)."""
    write([failed_point(plan, verdict)], warn)


def line(point: Point) -> str:
    """One point in InfluxDB's line protocol; tags sorted (what the server prefers)."""
    head = _escape(point.measurement, ", ")
    for key, value in sorted(point.tags.items()):
        if value:  # the protocol has no empty (or missing) tag value
            head += f",{_escape(key, ',= ')}={_escape(value, ',= ')}"
    body = ",".join(f"{_escape(k, ',= ')}={_field(v)}" for k, v in point.fields.items())
    return f"{head} {body} {point.time_ns}"


def _escape(text: str, special: str) -> str:
    """Names and tag values: only the protocol's separators are escaped (a backslash before
    anything else is taken as itself)."""
    for char in special:
        text = text.replace(char, "\\" + char)
    return text.replace("\n", "\\n")


def _field(value: FieldValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return f"{value}i"
    if isinstance(value, float):
        return repr(value)
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


@dataclass(frozen=True)
class InfluxConfig:
    """Where points go, from ``CCAT_INFLUXDB_*``; the password is left out of the repr."""

    url: str
    database: str
    username: str | None
    password: str | None = field(repr=False)
    timeout_seconds: float

    @classmethod
    def from_env(cls) -> InfluxConfig | None:
        url = settings.influxdb_url()
        if url is None:
            return None
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError for a port that is not a number)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("CCAT_INFLUXDB_URL must be http(s)://host[:port]")
        if parts.username is not None or parts.password is not None:
            raise ValueError(
                "CCAT_INFLUXDB_URL must not hold credentials: set CCAT_INFLUXDB_USERNAME and "
                "CCAT_INFLUXDB_PASSWORD"
            )
        return cls(
            url.rstrip("/"),
            settings.influxdb_database(),
            settings.influxdb_username(),
            settings.influxdb_password(),
            settings.influxdb_timeout_seconds(),
        )

    def write_url(self) -> str:
        query = urllib.parse.urlencode({"db": self.database, "precision": "ns"})
        return f"{self.url}/write?{query}"


def write(points: Sequence[Point | None], warn: Warn) -> bool:
    """Write the points in one request; True if the server took them. Without
    ``CCAT_INFLUXDB_URL`` nothing is sent. Never raises: a failure is one ``warn`` line."""
    batch = [p for p in points if p is not None]
    try:
        config = InfluxConfig.from_env()
    except ValueError as exc:  # a malformed setting (the message quotes no URL or password)
        warn(f"InfluxDB metrics not written: {exc}")
        return False
    if config is None or not batch:
        return False
    try:
        body = "\n".join(line(p) for p in batch).encode()
    except (TypeError, ValueError, AttributeError) as exc:  # a value line protocol cannot hold
        warn(f"InfluxDB metrics not written: {type(exc).__name__}: {exc}")
        return False
    request = urllib.request.Request(
        config.write_url(),
        data=body,
        method="POST",
        headers={"Content-Type": "text/plain; charset=utf-8"},
    )
    if config.username is not None:
        credentials = f"{config.username}:{config.password or ''}".encode()
        request.add_header("Authorization", "Basic " + base64.b64encode(credentials).decode())
    # On a thread of its own, so the whole write (name lookup included, which no socket
    # timeout bounds) is over for the caller after the bound; the thread ends by its sockets'
    # timeouts.
    outcome: list[str | None] = []
    sender = threading.Thread(
        target=lambda: outcome.append(_send(request, config.timeout_seconds)),
        name="influxdb-write",
        daemon=True,
    )
    sender.start()
    sender.join(config.timeout_seconds)
    detail = outcome[0] if outcome else f"timed out: no answer in {config.timeout_seconds:g} s"
    if detail is None:
        return True
    warn(
        f"InfluxDB: {len(batch)} point(s) not written to {config.write_url()} ({detail}); "
        "packaging goes on without them"
    )
    return False


def _send(request: urllib.request.Request, timeout: float) -> str | None:
    """POST the request; None when the server took it, else what went wrong."""
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
        return None
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code} {_answer(exc)}"
    except (OSError, http.client.HTTPException, ValueError) as exc:  # refused, timed out, ...
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        return f"{type(reason).__name__}: {reason}"


def _answer(exc: urllib.error.HTTPError) -> str:
    """The first line of the server's error answer (InfluxDB says what it refused)."""
    try:
        text = exc.read(300).decode("utf-8", "replace")
    except (OSError, http.client.HTTPException):
        text = ""
    return (text.strip().splitlines() or [str(exc.reason)])[0]
