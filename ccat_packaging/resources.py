"""Dagster resources: the operations database and the hosts that assemble packages."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg
from pydantic import PrivateAttr
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from ccat_packaging import allowed_roots, settings
from ccat_packaging.assembly.hosts import HostRunner, LocalRunner, Meter, is_same_host
from ccat_packaging.assembly.ssh import SshHosts, SshSettings
from ccat_packaging.db import make_engine, session_scope
from ccat_packaging.plans import Endpoint


class OpsDatabase(dg.ConfigurableResource):
    """The operations database at ``CCAT_OPS_DB_URL`` (else the embedded SQLite), read from
    the environment of the process that uses it. The resource has no config fields: the URL
    may carry a password, which the UI must not show, and no run config may point a run at
    another database (Dagster refuses run config for fields a resource lacks)."""

    _engine: Engine | None = PrivateAttr(default=None)

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        if self._engine is not None:
            self._engine.dispose()

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = make_engine(settings.ops_db_url())
        return self._engine

    @contextmanager
    def session(self) -> Iterator[Session]:
        """One transaction, committed when the block ends without error."""
        with session_scope(self.engine) as session:
            yield session


class AssemblyHosts(dg.ConfigurableResource):
    """Reaches the host that holds a location's files: this process when the location's host
    is this machine, otherwise SSH with one connection per host for the whole run.

    How SSH trusts hosts, which key it logs in with, and what it runs where are the
    deployment's: ``CCAT_SSH_*`` and ``CCAT_STALL_SECONDS``, read when the run first reaches a
    host over SSH. The resource has no config fields, so no run config can change or drop
    them, and the UI shows no secret. Host, user, port and path come from the location rows.
    A command that moves no bytes for ``CCAT_STALL_SECONDS`` fails as stalled; ``moved``
    counts the bytes this run's commands moved, which the package heartbeat watches.
    """

    _reach: HostReach = PrivateAttr(default_factory=lambda: HostReach())

    @property
    def moved(self) -> int:
        return self._reach.meter.moved

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        self.close()

    def close(self) -> None:
        """Close this run's SSH connections."""
        self._reach.close()

    def runner_for(self, endpoint: Endpoint) -> HostRunner:
        return self._reach.runner_for(endpoint)


class HostReach:
    """The runners of one run's hosts (what ``AssemblyHosts`` does, as plain Python): in-process
    for this machine, else over SSH, one connection per host. ``bound_seconds`` caps how long
    a command may stand still and a login may take below their ``CCAT_*`` settings: the
    backlog's free-space probes use it so that one unreachable buffer host holds up its
    record for seconds, not for a stall period."""

    def __init__(self, bound_seconds: float | None = None) -> None:
        self._bound = bound_seconds
        self._ssh: SshHosts | None = None
        self.meter = Meter()

    def runner_for(self, endpoint: Endpoint) -> HostRunner:
        allowed_roots.check(endpoint)
        if is_same_host(endpoint.host):
            return LocalRunner(self, endpoint, self.meter, self._bounded(settings.stall_seconds()))
        if self._ssh is None:
            full = ssh_settings()
            bounded = dataclasses.replace(
                full,
                stall_seconds=self._bounded(full.stall_seconds),
                connect_timeout=int(self._bounded(full.connect_timeout)),
            )
            self._ssh = SshHosts(bounded, self.meter)
        return self._ssh.runner(endpoint, hosts=self)

    def _bounded(self, seconds: float) -> float:
        return seconds if self._bound is None else min(seconds, self._bound)

    def close(self) -> None:
        if self._ssh is not None:
            self._ssh.close()
            self._ssh = None


def ssh_settings() -> SshSettings:
    """The SSH settings of this process's environment."""
    return SshSettings(
        stall_seconds=settings.stall_seconds(),
        key_filename=settings.ssh_key_file(),
        key_passphrase=settings.ssh_key_passphrase(),
        known_hosts=settings.ssh_known_hosts(),
        trust_unknown_hosts=settings.ssh_trust_unknown_hosts(),
        connect_timeout=settings.ssh_connect_timeout_seconds(),
        remote_python=settings.ssh_remote_python(),
        remote_dir=settings.ssh_remote_dir(),
    )
