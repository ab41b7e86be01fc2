"""The ``influxdb`` fixture (loaded with ``pytest_plugins``): a private InfluxDB server with an
admin user and a database, stopped after the test whether it failed or not."""

from __future__ import annotations

import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ccat_packaging_tests.deployment import free_port
from ccat_packaging_tests.influxdb_server import InfluxServer, config, ping, request

START_SECONDS = 30


@pytest.fixture
def influxdb(tmp_path: Path) -> Iterator[InfluxServer]:
    binary = shutil.which("influxd")
    if binary is None:
        pytest.fail("influxd is not installed: run scripts/test-setup.sh (Debian's influxdb)")
    root = tmp_path / "influxdb"
    root.mkdir()
    http_port, rpc_port = free_port(), free_port()
    (root / "influxdb.conf").write_text(config(root, http_port, rpc_port))
    log = (root / "influxd.log").open("wb")
    process = subprocess.Popen(
        [binary, "-config", str(root / "influxdb.conf")], stdout=log, stderr=subprocess.STDOUT
    )
    try:
        url = f"http://127.0.0.1:{http_port}"
        deadline = time.monotonic() + START_SECONDS
        while not ping(url):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    f"influxd did not answer /ping within {START_SECONDS} s: "
                    + (root / "influxd.log").read_text()[-2000:]
                )
            time.sleep(0.1)
        server = InfluxServer(url, "ccat_test", "admin", "pw-" + secrets.token_hex(8))
        # With no user yet, InfluxDB lets anyone create the first admin.
        create = f"CREATE USER {server.username} WITH PASSWORD '{server.password}' "
        request(server, "/query", {"q": create + "WITH ALL PRIVILEGES"}, login=False)
        request(server, "/query", {"q": f"CREATE DATABASE {server.database}"})
        yield server
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
