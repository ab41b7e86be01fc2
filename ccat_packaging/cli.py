"""``ccat-packaging``: the command line for the embedded demo and operators."""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from ccat_packaging import names, operations, settings
from ccat_packaging.db import failure, make_engine, redacted, session_scope
from ccat_packaging.errors import ConfigurationError, PackagingError
from ccat_packaging.models import Base, Status


def _init_db(_: argparse.Namespace) -> int:
    """Create missing tables (embedded or scratch databases; production has its own schema)."""
    url = _database_url(creates=True)
    engine = make_engine(url)
    Base.metadata.create_all(engine)
    engine.dispose()
    print(f"tables ready in {redacted(url)}")
    return 0


def _database_url(creates: bool) -> str:
    """CCAT_OPS_DB_URL, else the default file, else (after ``make demo``, when the default
    does not exist) the demo's, said in one line. A command that only reads refuses a missing
    SQLite file rather than create an empty database and report that it is empty."""
    url = settings.ops_db_url()
    if creates or not _sqlite_file_missing(url):
        return url
    demo = _demo_db()
    if not os.environ.get(settings.OPS_DB_URL_ENV) and demo.is_file():
        print(
            f"{settings.OPS_DB_URL_ENV} is unset and {url} does not exist: using the demo's "
            f"sqlite:///{demo}",
            file=sys.stderr,
        )
        # For the rest of this process, as the demo itself does: errors then name this one.
        os.environ[settings.OPS_DB_URL_ENV] = f"sqlite:///{demo}"
        return settings.ops_db_url()
    raise ConfigurationError(
        f"operations database {redacted(url)} does not exist; set {settings.OPS_DB_URL_ENV} "
        f"(after `make demo`: sqlite:///{demo}) or create it with `ccat-packaging init-db`"
    )


def _demo_db() -> Path:
    """Where `make demo` (DEMO_ROOT's default) keeps its operations database."""
    return Path.cwd() / ".ccat" / "demo" / "ops_db.sqlite"


def _sqlite_file_missing(url: str) -> bool:
    """SQLite creates a missing file on connecting; in-memory and ``file:`` URI databases are
    left to it."""
    parsed = make_url(url)
    database = parsed.database or ""
    return (
        parsed.get_backend_name() == "sqlite"
        and database not in ("", ":memory:")
        and not database.startswith("file:")
        and not Path(database).exists()
    )


@contextmanager
def _ops_session() -> Iterator[Session]:
    """One transaction on the operations database; the engine is closed with it."""
    engine = make_engine(_database_url(creates=False))
    try:
        with session_scope(engine) as session:
            yield session
    finally:
        engine.dispose()


def _status(_: argparse.Namespace) -> int:
    with _ops_session() as session:
        rows = operations.backlog(session)
    now = datetime.now(UTC)
    print(f"{'location':<28} {'files':>8} {'GB':>10} {'oldest':>10}  packages by status")
    for row in rows:
        age = (
            f"{(now - row.oldest_filed_at).total_seconds() / 3600:.1f} h"
            if row.oldest_filed_at
            else "-"
        )
        statuses = ", ".join(f"{k} {v}" for k, v in sorted(row.packages_by_status.items())) or "-"
        print(f"{row.location:<28} {row.files:>8} {row.bytes / 1e9:>10.3f} {age:>10}  {statuses}")
    return 0


_UNITS = {"m": 60, "h": 3600, "d": 86400}


def _duration(text: str) -> timedelta:
    """``90m``, ``2h``, ``3d``: how operators say how long a package has been stuck."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([mhd])", text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 90m, 2h or 3d")
    return timedelta(seconds=float(match[1]) * _UNITS[match[2]])


def _size(size: int | None) -> str:
    """Decimal units, as disks and tapes are sold: 1.3 GB."""
    if size is None:
        return "-"
    value, units = float(size), ["B", "kB", "MB", "GB", "TB", "PB"]
    while value >= 1000 and len(units) > 1:
        value, units = value / 1000, units[1:]
    return f"{size} B" if units[0] == "B" else f"{value:.1f} {units[0]}"


def _age(since: datetime, now: datetime) -> str:
    seconds = max((now - since).total_seconds(), 0)
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    if seconds < 86400:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def _shortened(text: str, width: int) -> str:
    """One line of at most ``width`` characters: reasons can be multi-line tracebacks."""
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 1] + "…"


def _list(args: argparse.Namespace) -> int:
    """Two or three lines per package, readable in 100 columns: the name last on its line so
    it is never cut (operators copy it into ``requeue`` and ``verify``), and the path alone on
    its line, whole, to be usable."""
    with _ops_session() as session:
        rows = operations.list_packages(
            session, args.status, args.location, args.older_than, args.limit
        )
    now = datetime.now(UTC)
    print(f"{'status':<11} {'files':>6} {'size':>9} {'age':>6}  {'checksum':<20}  name")
    for row in rows:
        checksum = f"{row.algorithm or 'sha256'}:{row.checksum[:12]}…" if row.checksum else "-"
        print(
            f"{row.status:<11} {row.files:>6} {_size(row.size):>9} {_age(row.updated_at, now):>6}"
            f"  {checksum:<20}  {row.name}"
        )
        print(f"    at {row.buffer_path or '-'}")
        if row.failure_reason:
            print(f"    reason: {_shortened(row.failure_reason, 88)}")
    more = f" (the first {args.limit}: --limit)" if len(rows) == args.limit else ""
    print(f"{len(rows)} package(s){more}; age is the time since the package last changed")
    return 0


def _dry_run(_: argparse.Namespace) -> int:
    with _ops_session() as session:
        rows = operations.dry_run(session)
    for row in rows:
        target = f"-> buffer {row.buffer}" if row.buffer else f"ERROR: {row.problem}"
        resumes = f", {len(row.resumes)} package(s) to resume" if row.resumes else ""
        print(f"{row.location}: {len(row.groups)} group(s){resumes} {target}")
        for key, files, size in row.groups:
            print(f"  {key:<48} {files:>7} files {size / 1e9:>10.3f} GB")
        for resume in row.resumes:
            print(f"  resume {resume.package}\n    {resume.reason}")
    return 1 if any(r.problem for r in rows) else 0


def _backfill(args: argparse.Namespace) -> int:
    """Runs of a location's groups now, whatever its sensor's state: the operator's backfill."""
    with _ops_session() as session:
        target = operations.backfill_groups(session, args.location, args.group or [])
    if not target.keys:
        print(
            f"nothing to backfill at {target.location!r}: no unpackaged files and no "
            "unfinished packages"
        )
        return 0
    _launch([target], f"ccat-packaging backfill {target.location}")
    return 0


def _launch(targets: list[operations.BackfillTarget], title: str) -> None:
    """One backfill per location through the deployment's webserver, and what happens next."""
    from ccat_packaging import backfills  # imports Dagster: only here

    with backfills.dagster_instance() as instance:
        for target in targets:
            launched = backfills.launch(instance, target, title)
            print(
                f"backfill {launched.backfill_id} of {launched.job}: "
                f"{len(target.keys)} partition(s), {launched.registered} newly registered"
            )
            for key in target.keys:
                print(f"  {key}")
            print(f"  {launched.url}/runs/b/{launched.backfill_id}?tab=runs")
    print(
        "next: the daemon submits one run per partition to the run queue; each starts when "
        "max_concurrent_runs and its host's assembly pool allow, and re-drives its group's "
        "failed packages (`ccat-packaging list --status failed` shows what is left)"
    )


def _requeue(args: argparse.Namespace) -> int:
    if not (args.package or args.location or args.all):
        print("say which: --package NAME, --location NAME or --all")
        return 2
    if args.launch:  # before anything is requeued: what the launch needs answers
        from ccat_packaging import backfills  # imports Dagster: only here

        with backfills.dagster_instance() as instance:
            backfills.ready(instance, settings.dagster_url())
    with _ops_session() as session:
        requeued = operations.requeue_failed(session, args.package, args.location)
    if not requeued:
        scope = f"at location {args.location!r}" if args.location else "anywhere"
        print(
            f"nothing requeued: no package {scope} is failed "
            "(`ccat-packaging list --status failed` shows which are)"
        )
        return 0
    for package in requeued:
        print(f"requeued {package.name}")
    print(f"{len(requeued)} package(s) requeued: pending, retry count 0")
    targets: dict[str, operations.BackfillTarget] = {}
    for package in requeued:
        target = targets.setdefault(
            package.location_slug,
            operations.BackfillTarget(package.location, package.location_slug, package.host, []),
        )
        if package.key not in target.keys:
            target.keys.append(package.key)
    if args.launch:
        _launch(list(targets.values()), "ccat-packaging requeue --launch")
        return 0
    sensors = _sensor_states()
    for target in targets.values():
        print(_what_happens_next(target.slug, target.keys, sensors))
    return 0


@dataclass(frozen=True)
class _Sensors:
    """What the Dagster instance says: which sensors are started, whether a daemon ticks."""

    started: set[str]
    daemon_running: bool


def _sensor_states() -> _Sensors | str:
    """The sensors' states from the Dagster instance at DAGSTER_HOME, or why they cannot be
    told. Our sensors default to stopped, so only a stored RUNNING counts as started."""
    if not os.environ.get("DAGSTER_HOME"):
        return "DAGSTER_HOME is not set, so whether the sensor is started cannot be told"
    from dagster import DagsterInstance
    from dagster._core.scheduler.instigation import (  # no public name for these (1.13)
        InstigatorStatus,
        InstigatorType,
    )

    try:
        with DagsterInstance.get() as instance:
            states = instance.all_instigator_state(instigator_type=InstigatorType.SENSOR)
            daemon = instance.get_daemon_statuses(["SENSOR"])["SENSOR"].healthy
    except Exception as exc:  # the requeue is committed: say why we cannot tell, not crash
        return f"the Dagster instance at DAGSTER_HOME cannot be read ({type(exc).__name__})"
    started = {s.instigator_name for s in states if s.status == InstigatorStatus.RUNNING}
    return _Sensors(started, bool(daemon))


def _what_happens_next(slug: str, keys: list[str], sensors: _Sensors | str) -> str:
    """The truth about who starts the runs: the sensor only if it is started and a daemon
    ticks it; otherwise the backfill command that starts them now."""
    sensor = names.sensor_name(slug)
    backfill = (
        f"  dagster job backfill -j {names.job_name(slug)} --partitions {','.join(keys)} "
        "-l ccat_packaging -w workspace.yaml --noprompt"
    )
    if isinstance(sensors, str):
        return f"{sensors}; if it is, its next tick requests the runs, else run:\n{backfill}"
    if sensor not in sensors.started:
        return f"sensor {sensor} is stopped: no run starts by itself; start it, or run:\n{backfill}"
    if not sensors.daemon_running:
        return f"sensor {sensor} is started but no dagster-daemon ticks it; run:\n{backfill}"
    return f"sensor {sensor} is running: its next tick requests a run per group"


def _verify(args: argparse.Namespace) -> int:
    """Re-hash a package at its buffer; the database is read first and not held open while
    a package of hundreds of GB is read."""
    from ccat_packaging.resources import AssemblyHosts  # imports Dagster: only here

    with _ops_session() as session:
        copies = operations.recorded_copies(session, args.package)
    failed = 0
    with AssemblyHosts().process_config_and_initialize_cm() as hosts:
        for copy in copies:
            check = operations.check_copy(hosts, copy)
            verdict = "OK" if check.ok else "MISMATCH"
            print(f"{verdict} {copy.package} at {copy.location.location_name} ({check.path})")
            print(f"  recorded {copy.size} bytes {copy.algorithm}:{copy.checksum}")
            print(f"  found    {check.size} bytes {copy.algorithm}:{check.checksum}")
            failed += not check.ok
    return 1 if failed else 0


def _demo(args: argparse.Namespace) -> int:
    from ccat_packaging import demo

    return demo.run(
        Path(args.root), reset=args.reset, size_scale=args.size_scale, obs_units=args.obs_units
    )


def _ui(args: argparse.Namespace) -> int:
    from ccat_packaging import demo

    return demo.serve_ui(Path(args.root), args.host, args.port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ccat-packaging",
        formatter_class=argparse.RawDescriptionHelpFormatter,  # keeps the paths whole
        epilog=f"{settings.OPS_DB_URL_ENV}: the operations database\n"
        f"  default: {settings.default_ops_db_url()}\n"
        f"  when that file is missing, after `make demo`: sqlite:///{_demo_db()}\n"
        "CCAT_DAGSTER_URL: the webserver `backfill` and `requeue --launch` launch through\n"
        "  default: http://127.0.0.1:3000; DAGSTER_HOME: the deployment's Dagster instance",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo_cmd = commands.add_parser("demo", help="package demo files end to end (SQLite, local)")
    demo_cmd.add_argument("--root", default=".ccat/demo", help="where the demo keeps its data")
    demo_cmd.add_argument("--reset", action="store_true", help="start from an empty demo")
    demo_cmd.add_argument(
        "--size-scale", type=float, default=1.0, help="multiply every demo file size by this"
    )
    demo_cmd.add_argument(
        "--obs-units", type=int, default=4, help="executed obs units per instrument (4)"
    )
    demo_cmd.set_defaults(handler=_demo)
    ui_cmd = commands.add_parser(
        "ui", help="dagster-daemon and dagster-webserver on the demo's instance (make ui)"
    )
    ui_cmd.add_argument("--root", default=".ccat/demo", help="where the demo keeps its data")
    ui_cmd.add_argument("--host", default="127.0.0.1", help="the webserver's address")
    ui_cmd.add_argument("--port", type=int, default=3000, help="the webserver's port")
    ui_cmd.set_defaults(handler=_ui)
    init_cmd = commands.add_parser("init-db", help="create the tables in CCAT_OPS_DB_URL")
    init_cmd.set_defaults(handler=_init_db)
    commands.add_parser(
        "status", help="backlog per location, oldest unpackaged file, packages by status"
    ).set_defaults(handler=_status)
    listing = commands.add_parser(
        "list", help="packages with their files, size, checksum, buffer path, failure and age"
    )
    listing.add_argument("--status", type=Status, choices=list(Status), help="only this status")
    listing.add_argument(
        "--location", help="only packages from this SOURCE or with a copy at this location"
    )
    listing.add_argument(
        "--older-than", type=_duration, metavar="AGE", help="unchanged for at least 90m, 2h, 3d"
    )
    listing.add_argument("--limit", type=int, default=100, help="at most this many (100)")
    listing.set_defaults(handler=_list)
    commands.add_parser(
        "dry-run", help="what the sensors would package now, changing nothing"
    ).set_defaults(handler=_dry_run)
    requeue = commands.add_parser("requeue", help="failed packages back to pending")
    requeue.add_argument("--package", help="one package, by name")
    requeue.add_argument("--location", help="every failed package of a SOURCE location")
    requeue.add_argument("--all", action="store_true", help="every failed package")
    requeue.add_argument(
        "--launch",
        action="store_true",
        help="then launch their groups' runs now, as `backfill` does, instead of leaving them "
        "to the sensors",
    )
    requeue.set_defaults(handler=_requeue)
    backfill = commands.add_parser(
        "backfill",
        help="launch runs of a SOURCE location's groups now, through the Dagster webserver "
        "(CCAT_DAGSTER_URL) and the run queue, whatever its sensor's state",
    )
    backfill.add_argument("location", help="the SOURCE location's name")
    backfill.add_argument(
        "--group",
        action="append",
        metavar="KEY",
        help="a group's partition key <location>__eou<id>__mod<id> (repeatable); none: every "
        "group with unpackaged files or unfinished packages",
    )
    backfill.set_defaults(handler=_backfill)
    verify = commands.add_parser(
        "verify", help="re-hash a completed package at its buffer and compare with the record"
    )
    verify.add_argument("package", help="the package's name")
    verify.set_defaults(handler=_verify)
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args))
    except PackagingError as exc:
        print(f"error: {exc}")
        return 1
    except SQLAlchemyError as exc:  # one line without the password, not a traceback
        print(f"error: operations database {failure(settings.ops_db_url(), exc)}")
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
