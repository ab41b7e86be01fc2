"""A private InfluxDB 1.x server for tests: Debian's ``influxd`` (scripts/test-setup.sh
installs it) with a config of its own: data, meta and WAL under the test's directory, HTTP on
127.0.0.1 at a free port, authentication on, no usage reporting. The fixture that starts it
is in ``influxdb_fixtures``."""

from __future__ import annotations

import base64
import json
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest


@dataclass(frozen=True)
class InfluxServer:
    url: str
    database: str
    username: str
    password: str

    def env(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Point this process's ``CCAT_INFLUXDB_*`` at the server."""
        monkeypatch.setenv("CCAT_INFLUXDB_URL", self.url)
        monkeypatch.setenv("CCAT_INFLUXDB_DATABASE", self.database)
        monkeypatch.setenv("CCAT_INFLUXDB_USERNAME", self.username)
        monkeypatch.setenv("CCAT_INFLUXDB_PASSWORD", self.password)

    def query(self, q: str) -> list[dict[str, Any]]:
        """The rows of an InfluxQL query, as {column: value} (empty when nothing matched)."""
        params = urllib.parse.urlencode({"db": self.database, "q": q, "epoch": "ns"})
        body = request(self, f"/query?{params}", None)
        [result] = body["results"]
        assert "error" not in result, result
        rows = []
        for series in result.get("series", []):
            for values in series["values"]:
                rows.append(
                    {
                        "measurement": series["name"],
                        **dict(zip(series["columns"], values, strict=True)),
                    }
                )
        return rows


def request(
    server: InfluxServer, path: str, form: dict[str, str] | None, login: bool = True
) -> dict[str, Any]:
    data = urllib.parse.urlencode(form).encode() if form is not None else None
    request = urllib.request.Request(server.url + path, data=data)
    if login:
        credentials = f"{server.username}:{server.password}".encode()
        request.add_header("Authorization", "Basic " + base64.b64encode(credentials).decode())
    with urllib.request.urlopen(request, timeout=10) as response:
        return dict(json.load(response))


def config(root: Path, http_port: int, rpc_port: int) -> str:
    return f"""reporting-disabled = true
bind-address = "127.0.0.1:{rpc_port}"
[meta]
  dir = "{root / "meta"}"
[data]
  dir = "{root / "data"}"
  wal-dir = "{root / "wal"}"
  query-log-enabled = false
[http]
  bind-address = "127.0.0.1:{http_port}"
  auth-enabled = true
  log-enabled = false
[monitor]
  store-enabled = false
"""


def ping(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/ping", timeout=1) as response:
            return int(response.status) == 204
    except OSError:
        return False
