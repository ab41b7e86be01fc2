"""Shared fixtures: a scratch PostgreSQL database per test, and a builder for test worlds."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, text

from ccat_packaging.db import make_engine
from ccat_packaging.models import Base
from ccat_packaging_tests.world import World

PG_ADMIN_URL = os.environ.get(
    "CCAT_TEST_PG_ADMIN_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
)


def _postgres_is_up() -> bool:
    return subprocess.run(["pg_isready", "-q", "-h", "127.0.0.1", "-p", "5432"]).returncode == 0


@pytest.fixture(scope="session")
def pg_admin() -> Iterator[Engine]:
    """The server's maintenance database; starts the server when it is down, else fails loudly."""
    if not _postgres_is_up():
        versions = os.listdir("/etc/postgresql") if os.path.isdir("/etc/postgresql") else []
        for version in versions:
            subprocess.run(
                ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "start"],
                check=False,
            )
        if not _postgres_is_up():
            pytest.fail("PostgreSQL is not running on 127.0.0.1:5432 and could not be started")
    engine = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    yield engine
    engine.dispose()


@contextmanager
def scratch_ops_db(pg_admin: Engine) -> Iterator[str]:
    """A scratch database with the schema, dropped on the way out."""
    name = f"ccat_test_{uuid.uuid4().hex[:12]}"
    with pg_admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    engine = make_engine(url)
    Base.metadata.create_all(engine)
    engine.dispose()
    try:
        yield url
    finally:
        with pg_admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@contextmanager
def scratch_dagster_db(pg_admin: Engine) -> Iterator[dict[str, str]]:
    """An empty database for a Dagster instance and the ``DAGSTER_PG_*`` variables that the
    production dagster.yaml reads; Dagster creates its tables on first use."""
    name = f"ccat_dagster_{uuid.uuid4().hex[:12]}"
    with pg_admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin = pg_admin.url
    try:
        yield {
            "DAGSTER_PG_USER": admin.username or "postgres",
            "DAGSTER_PG_PASSWORD": admin.password or "",
            "DAGSTER_PG_HOST": admin.host or "127.0.0.1",
            "DAGSTER_PG_PORT": str(admin.port or 5432),
            "DAGSTER_PG_DB": name,
        }
    finally:
        with pg_admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def pg_url(pg_admin: Engine) -> Iterator[str]:
    """A scratch database with the schema, dropped after the test."""
    with scratch_ops_db(pg_admin) as url:
        yield url


@pytest.fixture
def dagster_pg_env(pg_admin: Engine) -> Iterator[dict[str, str]]:
    """An empty Dagster instance database and its ``DAGSTER_PG_*`` variables."""
    with scratch_dagster_db(pg_admin) as env:
        yield env


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'ops_db.sqlite'}"
    engine = make_engine(url)
    Base.metadata.create_all(engine)
    engine.dispose()
    return url


@pytest.fixture(params=["postgresql", "sqlite"])
def any_db_url(request: pytest.FixtureRequest) -> str:
    """The same test on both backends: PostgreSQL in production, SQLite embedded."""
    return str(request.getfixturevalue("pg_url" if request.param == "postgresql" else "sqlite_url"))


def _world(url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    monkeypatch.setenv("CCAT_OPS_DB_URL", url)
    w = World(url, tmp_path)
    yield w
    w.close()


@pytest.fixture
def world(pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    """A PostgreSQL operations database plus real directories, the env pointing at both."""
    yield from _world(pg_url, tmp_path, monkeypatch)


@pytest.fixture
def any_world(any_db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    """The same world on PostgreSQL and on the embedded SQLite default."""
    yield from _world(any_db_url, tmp_path, monkeypatch)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB tmpfs: a buffer that really runs out of space."""
    mount = tmp_path / "small_disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)
