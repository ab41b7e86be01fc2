"""The production processes for end-to-end tests: dagster-daemon and dagster-webserver started
by ``scripts/run-dagster.sh`` on a PostgreSQL-backed instance, driven over GraphQL.

The instance's dagster.yaml is the repository's, with test timings: a one-second run queue and
one assembly slot per host (so the pool's limit is observable).
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from ccat_packaging.processes import start_group, stop_group

REPO = Path(__file__).resolve().parent.parent
LOCATION = "ccat_packaging"
REPOSITORY = "__repository__"
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for(what: str, probe: Callable[[], T | None], timeout: float, every: float = 0.5) -> T:
    """Poll until ``probe`` returns something truthy; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


CELERY_INSTANCE = REPO / "docs" / "examples" / "dagster-celery.yaml"


def start_in_own_session(
    argv: list[str], env: dict[str, str], log: Path, cwd: Path = REPO
) -> subprocess.Popen[bytes]:
    """``argv`` as the leader of a process group of its own (``stop_group`` stops all of it),
    its output appended to ``log``."""
    with open(log, "ab") as out:
        return start_group(argv, env, cwd, out)


def write_test_instance(home: Path, production: Path = REPO / "dagster.yaml") -> None:
    """A production instance file with test timings, same structure otherwise: a crashed
    run's pool slot is freed after seconds instead of minutes."""
    config = yaml.safe_load(production.read_text())
    config["run_queue"]["dequeue_interval_seconds"] = 1
    config["concurrency"]["pools"]["default_limit"] = 1
    config["run_monitoring"]["poll_interval_seconds"] = 2
    config["run_monitoring"]["free_slots_after_run_end_seconds"] = 5
    if "run_launcher" in config:
        config["run_launcher"]["config"]["worker_silence_seconds"] = 30
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))


@dataclass
class Deployment:
    port: int
    processes: dict[str, subprocess.Popen[bytes]]
    logs: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def graphql(self, query: str, **variables: Any) -> dict[str, Any]:
        request = urllib.request.Request(
            f"{self.url}/graphql",
            data=json.dumps({"query": query, "variables": variables}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.load(response)
        if answer.get("errors"):
            raise AssertionError(f"GraphQL errors: {answer['errors']}")
        return dict(answer["data"])

    def check_alive(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                log = (self.logs / f"{name}.log").read_text()[-3000:]
                raise AssertionError(f"{name} exited with {process.returncode}:\n{log}")


@contextlib.contextmanager
def running_deployment(
    env: dict[str, str], logs: Path, port: int | None = None
) -> Iterator[Deployment]:
    """Daemon and webserver, each in its own process group, stopped (group and all: code
    servers, run workers) on the way out."""
    logs.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    env = {
        **env,
        "DAGSTER_BIN": str(Path(sys.executable).parent),
        "HOST": "127.0.0.1",
        "PORT": str(port),
    }
    processes: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name in ("daemon", "webserver"):
            processes[name] = start_in_own_session(
                [str(REPO / "scripts" / "run-dagster.sh"), name], env, logs / f"{name}.log"
            )
        deployment = Deployment(port, processes, logs)
        wait_until_loaded(deployment)
        yield deployment
    finally:
        for process in processes.values():
            stop_group(process)


def wait_until_loaded(deployment: Deployment, timeout: float = 90) -> None:
    """Until the webserver answers and has loaded the code location (failing on its error)."""
    wait_for("the webserver", lambda: _answers(deployment), timeout=timeout)
    wait_for("the code location", lambda: _location_loaded(deployment), timeout=timeout)


def _answers(deployment: Deployment) -> bool:
    deployment.check_alive()
    try:
        with urllib.request.urlopen(f"{deployment.url}/server_info", timeout=5) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def _location_loaded(deployment: Deployment) -> bool:
    data = deployment.graphql(
        """{ workspaceOrError { ... on Workspace { locationEntries {
             name loadStatus
             locationOrLoadError { __typename ... on PythonError { message } } } } } }"""
    )
    for entry in data["workspaceOrError"]["locationEntries"]:
        loaded = entry["locationOrLoadError"]
        if loaded and loaded["__typename"] == "PythonError":
            raise AssertionError(f"the code location failed to load: {loaded['message']}")
        if entry["name"] == LOCATION and entry["loadStatus"] == "LOADED":
            return True
    return False
