"""Settings from ``CCAT_``-prefixed environment variables, with defaults for the embedded set-up.

Values are read when asked for, never at import, so tests and the demo can set them per process.
"""

from __future__ import annotations

import os
import urllib.parse
from pathlib import Path

from ccat_packaging.errors import ConfigurationError

OPS_DB_URL_ENV = "CCAT_OPS_DB_URL"


def default_ops_db_url() -> str:
    """The embedded default: a SQLite file in the working directory, no server needed."""
    return f"sqlite:///{Path.cwd() / '.ccat' / 'ops_db.sqlite'}"


def ops_db_url() -> str:
    return os.environ.get(OPS_DB_URL_ENV) or default_ops_db_url()


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None


def dagster_url() -> str:
    """``CCAT_DAGSTER_URL``: the Dagster webserver through whose GraphQL API ``ccat-packaging
    backfill`` and ``requeue --launch`` launch runs (``make prod-webserver``'s default)."""
    url = (os.environ.get("CCAT_DAGSTER_URL") or "http://127.0.0.1:3000").rstrip("/")
    if "@" in urllib.parse.urlsplit(url).netloc:  # it is printed in every answer
        raise ConfigurationError(
            "CCAT_DAGSTER_URL must not hold credentials (it is printed): give the address of "
            "an authenticating proxy instead"
        )
    return url


def run_queues() -> str:
    """``CCAT_RUN_QUEUES``: per-location Celery queues, ``location name=queue,...``
    (parsed and checked by ``run_placement``)."""
    return os.environ.get("CCAT_RUN_QUEUES", "")


def allowed_roots() -> str:
    """``CCAT_ALLOWED_ROOTS``: the roots each host may be read and written under
    (parsed and checked by ``allowed_roots``); empty confines nothing."""
    return os.environ.get("CCAT_ALLOWED_ROOTS", "")


def sensor_interval_seconds() -> int:
    """Minimum gap between two ticks of a location sensor."""
    return _int("CCAT_SENSOR_INTERVAL_SECONDS", 60)


def sensor_max_requests() -> int:
    """Run requests one tick may yield; the daemon spends ~150 ms per request."""
    return _int("CCAT_SENSOR_MAX_REQUESTS", 100)


def sensor_rescan_seconds() -> int:
    """How often a sensor rescans all unpackaged files instead of only those past its cursor."""
    return _int("CCAT_SENSOR_RESCAN_SECONDS", 600)


def package_max_bytes() -> int:
    """Size cap of one package; larger groups are split into numbered parts."""
    return _int("CCAT_PACKAGE_MAX_BYTES", 50_000_000_000)


def package_max_files() -> int:
    """Member cap of one package."""
    return _int("CCAT_PACKAGE_MAX_FILES", 10_000)


def retry_base_seconds() -> int:
    """First retry delay of a retryable failure; doubled per attempt, with jitter."""
    return _int("CCAT_RETRY_BASE_SECONDS", 10)


def stale_after_seconds() -> int:
    """An unfinished package whose heartbeat is older than this is taken back up."""
    return _int("CCAT_STALE_AFTER_SECONDS", 600)


def stall_seconds() -> int:
    """An assembly command that moves no bytes for this long fails as retryable and frees its
    pool slot. Beats come every ``CCAT_STALE_AFTER_SECONDS / 4`` in which bytes moved, so
    keep it below three quarters of that: then the lease of a live run never looks stale
    while it waits to notice a stall."""
    value = _int("CCAT_STALL_SECONDS", 300)
    if value <= 0:
        raise ValueError(f"CCAT_STALL_SECONDS must be a positive number of seconds, got {value}")
    return value


def ssh_key_file() -> str | None:
    """``CCAT_SSH_KEY_FILE``: the one private key for SSH logins; None: the user's default
    keys and agent."""
    return os.environ.get("CCAT_SSH_KEY_FILE") or None


def ssh_key_passphrase() -> str | None:
    """``CCAT_SSH_KEY_PASSPHRASE``: the passphrase of that key."""
    return os.environ.get("CCAT_SSH_KEY_PASSPHRASE") or None


def ssh_known_hosts() -> str | None:
    """``CCAT_SSH_KNOWN_HOSTS``: the file host keys are checked against; None:
    ``~/.ssh/known_hosts``."""
    return os.environ.get("CCAT_SSH_KNOWN_HOSTS") or None


def ssh_trust_unknown_hosts() -> bool:
    """``CCAT_SSH_TRUST_UNKNOWN_HOSTS``: accepting (and recording) keys of hosts not yet known
    is an explicit opt-in (``1``, ``true``, ``yes``); anything else refuses them."""
    value = os.environ.get("CCAT_SSH_TRUST_UNKNOWN_HOSTS", "")
    return value.strip().lower() in {"1", "true", "yes"}


def ssh_connect_timeout_seconds() -> int:
    """Seconds to connect to a host and log in."""
    return _int("CCAT_SSH_CONNECT_TIMEOUT_SECONDS", 15)


def ssh_remote_python() -> str:
    """``CCAT_SSH_REMOTE_PYTHON``: the python3 (3.8 or newer) that runs the tar agent on
    remote hosts."""
    return os.environ.get("CCAT_SSH_REMOTE_PYTHON") or "/usr/bin/python3"


def ssh_remote_dir() -> str:
    """``CCAT_SSH_REMOTE_DIR``: where the tar agent is kept on remote hosts (relative: to the
    login's home)."""
    return os.environ.get("CCAT_SSH_REMOTE_DIR") or ".cache/ccat-packaging"


def partition_retention_days() -> int:
    """A file group whose packages all completed longer ago than this loses its Dagster
    partition (the database keeps everything); a late file brings it back."""
    return _int("CCAT_PARTITION_RETENTION_DAYS", 30)


def run_retention_days() -> int:
    """Finished packaging runs older than this are deleted from the Dagster instance, with
    their event logs; 0 keeps them forever."""
    return _int("CCAT_RUN_RETENTION_DAYS", 90)


def archive_mode() -> int | None:
    """``CCAT_ARCHIVE_MODE``: the permission bits (octal, e.g. ``0440``) of published archives;
    unset, they get what the umask of the agent on the buffer's host leaves of 0666, as any
    file it creates would."""
    raw = os.environ.get("CCAT_ARCHIVE_MODE", "")
    if raw == "":
        return None
    try:
        mode = int(raw, 8)
    except ValueError:
        raise ValueError(f"CCAT_ARCHIVE_MODE must be octal permission bits, got {raw!r}") from None
    if not 0 <= mode <= 0o777:
        raise ValueError(f"CCAT_ARCHIVE_MODE must be permission bits (0 to 0777), got {raw!r}")
    return mode


INFLUXDB_PASSWORD_ENV = "CCAT_INFLUXDB_PASSWORD"


def influxdb_url() -> str | None:
    """``CCAT_INFLUXDB_URL``: the InfluxDB 1.x server metrics are written to
    (``http://host:8086``); unset, none are written."""
    return os.environ.get("CCAT_INFLUXDB_URL") or None


def influxdb_database() -> str:
    """``CCAT_INFLUXDB_DATABASE``: the database the points go to."""
    return os.environ.get("CCAT_INFLUXDB_DATABASE") or "ccat_packaging"


def influxdb_username() -> str | None:
    """``CCAT_INFLUXDB_USERNAME``: the user that writes; unset, writes are unauthenticated."""
    return os.environ.get("CCAT_INFLUXDB_USERNAME") or None


def influxdb_password() -> str | None:
    """``CCAT_INFLUXDB_PASSWORD``: that user's password, a secret: only ever sent in the
    request's Authorization header, never logged."""
    return os.environ.get(INFLUXDB_PASSWORD_ENV) or None


def influxdb_timeout_seconds() -> float:
    """``CCAT_INFLUXDB_TIMEOUT_SECONDS``: how long one write may take in all (name lookup,
    connection, answer) before its points are given up with a warning; a package or the
    backlog job never waits longer on monitoring."""
    value = _int("CCAT_INFLUXDB_TIMEOUT_SECONDS", 3)
    if value <= 0:
        raise ValueError(f"CCAT_INFLUXDB_TIMEOUT_SECONDS must be positive, got {value}")
    return value
