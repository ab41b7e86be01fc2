"""Dagster resources: the operations database and the hosts that assemble packages."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg
from pydantic import Field, PrivateAttr
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from ccat_packaging import allowed_roots, settings
from ccat_packaging.assembly.hosts import HostRunner, LocalRunner, Meter, is_same_host
from ccat_packaging.assembly.ssh import SshHosts, SshSettings
from ccat_packaging.db import make_engine, session_scope
from ccat_packaging.plans import Endpoint


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
    """Reaches the host that holds a location's files: this process when the location's host
    is this machine, otherwise SSH with one connection per host for the whole run.

    The key, its passphrase and the known-hosts file come from the environment (``EnvVar``),
    never from the repository; host, user, port and path come from the location rows. A
    command that moves no bytes for ``CCAT_STALL_SECONDS`` fails as stalled; ``moved`` counts
    the bytes this run's commands moved, which the package heartbeat watches.
    """

    key_filename: str | None = Field(
        default=None, description="private key for SSH logins; None: the user's default keys"
    )
    key_passphrase: str | None = Field(default=None, description="passphrase of that key")
    known_hosts: str | None = Field(
        default=None,
        description="known-hosts file that host keys are checked against; None: ~/.ssh/known_hosts",
    )
    trust_unknown_hosts: bool = Field(
        default=False,
        description="accept (and record) keys of hosts not yet known; a changed key is "
        "refused regardless",
    )
    connect_timeout: int = Field(default=15, description="seconds to connect and log in")
    remote_python: str = Field(
        default="/usr/bin/python3", description="python3 on the remote hosts (3.8 or newer)"
    )
    remote_dir: str = Field(
        default=".cache/ccat-packaging",
        description="where the tar agent is kept on remote hosts (relative: to the login home)",
    )

    _ssh: SshHosts | None = PrivateAttr(default=None)
    _meter: Meter = PrivateAttr(default_factory=Meter)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self._ssh = None

    @property
    def moved(self) -> int:
        return self._meter.moved

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        self.close()

    def close(self) -> None:
        """Close this run's SSH connections."""
        if self._ssh is not None:
            self._ssh.close()
            self._ssh = None

    def runner_for(self, endpoint: Endpoint) -> HostRunner:
        allowed_roots.check(endpoint)
        if is_same_host(endpoint.host):
            return LocalRunner(self, endpoint, self._meter, settings.stall_seconds())
        if self._ssh is None:
            self._ssh = SshHosts(
                SshSettings(
                    stall_seconds=settings.stall_seconds(),
                    key_filename=self.key_filename,
                    key_passphrase=self.key_passphrase,
                    known_hosts=self.known_hosts,
                    trust_unknown_hosts=self.trust_unknown_hosts,
                    connect_timeout=self.connect_timeout,
                    remote_python=self.remote_python,
                    remote_dir=self.remote_dir,
                ),
                self._meter,
            )
        return self._ssh.runner(endpoint, hosts=self)


SSH_KEY_FILE_ENV = "CCAT_SSH_KEY_FILE"
SSH_KEY_PASSPHRASE_ENV = "CCAT_SSH_KEY_PASSPHRASE"
SSH_KNOWN_HOSTS_ENV = "CCAT_SSH_KNOWN_HOSTS"
SSH_TRUST_UNKNOWN_HOSTS_ENV = "CCAT_SSH_TRUST_UNKNOWN_HOSTS"


def assembly_hosts_from_env() -> AssemblyHosts:
    """SSH settings from ``CCAT_SSH_*``: paths and the passphrase through ``EnvVar`` (resolved
    at run time, never shown in the UI), each only when set, so a machine without SSH set-up
    (the embedded demo) loads as well. Trusting unknown host keys is an explicit opt-in."""
    trust = os.environ.get(SSH_TRUST_UNKNOWN_HOSTS_ENV, "").strip().lower()
    return AssemblyHosts(
        key_filename=_env_var(SSH_KEY_FILE_ENV),
        key_passphrase=_env_var(SSH_KEY_PASSPHRASE_ENV),
        known_hosts=_env_var(SSH_KNOWN_HOSTS_ENV),
        trust_unknown_hosts=trust in ("1", "true", "yes"),
    )


def _env_var(name: str) -> dg.EnvVar | None:
    return dg.EnvVar(name) if os.environ.get(name) else None
