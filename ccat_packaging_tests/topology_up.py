"""``make topology-up`` / ``make topology-down``: the observatory's topology (``topology.py``)
with the whole deployment on it, for a person to look at.

``up`` creates scratch databases on the local PostgreSQL, files a few instrument files at both
instrument computers, starts the broker, the hosts' sshd, the site's worker on the buffer host
and, centrally, dagster-daemon and dagster-webserver (UI on http://127.0.0.1:$PORT, 3000 by
default), then returns, leaving a supervisor process that holds it all. ``down`` stops that
process, which tears everything down and drops the databases; it also removes what a killed
supervisor left behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import create_engine, text

from ccat_packaging.db import make_engine
from ccat_packaging.models import Base, LocationType
from ccat_packaging_tests.deployment import (
    CELERY_INSTANCE,
    REPO,
    running_deployment,
    write_test_instance,
)
from ccat_packaging_tests.topology import SITE, Network, observatory
from ccat_packaging_tests.world import World

STATE = REPO / ".ccat" / "topology"
PREFIX, NET = "ccat", 77
ADMIN_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"


@contextlib.contextmanager
def _scratch_databases() -> Iterator[dict[str, str]]:
    names = {kind: f"ccat_topology_{kind}_{uuid.uuid4().hex[:8]}" for kind in ("ops", "dagster")}
    admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        for name in names.values():
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield names
    finally:
        with admin.connect() as conn:
            for name in names.values():
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _serve(stop: threading.Event) -> None:
    port = int(os.environ.get("PORT", "3000"))
    with _scratch_databases() as names, observatory(STATE / "run", PREFIX, NET) as obs:
        ops_url = f"postgresql+psycopg2://postgres@127.0.0.1:5432/{names['ops']}"
        engine = make_engine(ops_url)
        Base.metadata.create_all(engine)
        engine.dispose()
        world = World(ops_url, STATE / "run")
        site = world.site(SITE)
        hosts = obs.network.hosts
        for name in ("instr1", "instr2"):
            location = world.location(
                site, f"{name}_raw", LocationType.SOURCE, host=hosts[name].address,
                user="root", root=obs.disk(name) / "raw",
            )  # fmt: skip
            group = world.group(location)
            for i in range(3):
                world.file_bytes(group, f"scan/obs_{i:03d}.dat", size=4 << 20)
        world.location(
            site, f"{SITE}_buffer", LocationType.BUFFER, host=hosts["buffer"].address,
            user="root", root=obs.disk("buffer") / "packages",
        )  # fmt: skip
        world.close()
        home = STATE / "run" / "dagster_home"
        write_test_instance(home, CELERY_INSTANCE)
        dagster_pg = {
            "DAGSTER_PG_USER": "postgres",
            "DAGSTER_PG_PASSWORD": "",
            "DAGSTER_PG_HOST": "127.0.0.1",
            "DAGSTER_PG_PORT": "5432",
            "DAGSTER_PG_DB": names["dagster"],
        }
        central = {
            **obs.central_env(dagster_pg, ops_url, home),
            "CCAT_SENSOR_INTERVAL_SECONDS": "10",
        }
        worker = obs.start_worker(obs.site_env(central), STATE / "logs" / "worker.log")
        try:
            with running_deployment(central, STATE / "logs", port=port):
                (STATE / "ready").write_text(f"http://127.0.0.1:{port}\n")
                stop.wait()
        finally:
            worker.stop()


def up() -> int:
    if (STATE / "pid").exists():
        print(f"already up (pid {(STATE / 'pid').read_text().strip()}): make topology-down first")
        return 1
    shutil.rmtree(STATE, ignore_errors=True)  # a fresh topology: new keys, new files
    (STATE / "logs").mkdir(parents=True)
    with open(STATE / "logs" / "supervisor.log", "ab") as log:
        supervisor = subprocess.Popen(
            [sys.executable, "-u", "-m", "ccat_packaging_tests.topology_up", "serve"],
            cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    (STATE / "pid").write_text(str(supervisor.pid))
    deadline = time.monotonic() + 300
    while not (STATE / "ready").exists():
        if supervisor.poll() is not None or time.monotonic() > deadline:
            print((STATE / "logs" / "supervisor.log").read_text()[-3000:])
            down()
            return 1
        time.sleep(1)
    hosts = Network(PREFIX, NET).hosts
    print(f"UI: {(STATE / 'ready').read_text().strip()}  (start the sensors in Automation)")
    print("hosts: " + ", ".join(f"{h.name} {h.address} ({h.namespace})" for h in hosts.values()))
    print(f"logs: {STATE / 'logs'}; stop with: make topology-down")
    return 0


def _is_supervisor(pid: int) -> bool:
    """True while ``pid`` is our supervisor (not a process that got its number since)."""
    try:
        return b"ccat_packaging_tests.topology_up" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def down() -> int:
    pid_file = STATE / "pid"
    if pid_file.exists():
        pid = int(pid_file.read_text())
        if _is_supervisor(pid):
            os.kill(pid, signal.SIGTERM)  # it tears everything down on its way out
            deadline = time.monotonic() + 60
            while _is_supervisor(pid) and time.monotonic() < deadline:
                time.sleep(0.5)
            if _is_supervisor(pid):
                os.kill(pid, signal.SIGKILL)
                print(
                    "the supervisor did not stop within 60 s and was killed: its broker, worker, "
                    "daemon and webserver may still run (ps -ef | grep -e celery -e dagster)"
                )
        pid_file.unlink()
    Network(PREFIX, NET).destroy()  # what a killed supervisor left behind
    (STATE / "ready").unlink(missing_ok=True)
    print("topology down")
    return 0


def main() -> int:
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if command == "serve":
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        _serve(stop)
        return 0
    if command in ("up", "down"):
        return up() if command == "up" else down()
    print("usage: python -m ccat_packaging_tests.topology_up up|down", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
