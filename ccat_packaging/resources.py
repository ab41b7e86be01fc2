"""Dagster resources: the operations database and the hosts that assemble packages."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg
from pydantic import PrivateAttr
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from ccat_packaging import settings
from ccat_packaging.assembly.hosts import HostRunner, LocalRunner, is_same_host
from ccat_packaging.claiming import Endpoint
from ccat_packaging.db import make_engine, session_scope
from ccat_packaging.errors import ConfigurationError


class OpsDatabase(dg.ConfigurableResource):
    """The operations database; ``url`` may carry a password, so bind it with ``EnvVar``."""

    url: str

    _engine: Engine | None = PrivateAttr(default=None)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self._engine = make_engine(self.url)

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        if self._engine is not None:
            self._engine.dispose()

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = make_engine(self.url)
        return self._engine

    @contextmanager
    def session(self) -> Iterator[Session]:
        """One transaction, committed when the block ends without error."""
        with session_scope(self.engine) as session:
            yield session


def ops_database_from_env() -> OpsDatabase:
    """``CCAT_OPS_DB_URL`` through ``EnvVar`` (never shown in the UI), else the embedded SQLite."""
    if os.environ.get(settings.OPS_DB_URL_ENV):
        return OpsDatabase(url=dg.EnvVar(settings.OPS_DB_URL_ENV))
    return OpsDatabase(url=settings.default_ops_db_url())


class AssemblyHosts(dg.ConfigurableResource):
    """Chooses how to reach the host that holds a location's files."""

    def runner_for(self, endpoint: Endpoint) -> HostRunner:
        if is_same_host(endpoint.host):
            return LocalRunner()
        raise ConfigurationError(
            f"location {endpoint.location_name!r} is on host {endpoint.host!r}, which is not "
            "this machine, and no SSH runner is configured"
        )
