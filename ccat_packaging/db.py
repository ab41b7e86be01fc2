"""Engine and session helpers for the operations database."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from ccat_packaging.errors import DatabaseUnavailableError


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets a busy timeout and foreign keys switched on."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        engine = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


def redacted(url: str) -> str:
    """The URL as it may appear in logs and the UI: never with its password."""
    return make_url(url).render_as_string(hide_password=True)


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """One transaction: commit on success, roll back on any error."""
    factory = sessionmaker(bind=engine, expire_on_commit=False)
    with factory() as session, session.begin():
        yield session


def unavailable(exc: BaseException) -> DatabaseUnavailableError | None:
    """The error to report when ``exc`` means the database dropped or refused a connection
    (else None): one line from the driver, which names host and port but never the password."""
    if isinstance(exc, OperationalError | InterfaceError) or (
        isinstance(exc, DBAPIError) and exc.connection_invalidated
    ):
        lines = str(exc.orig or exc).strip().splitlines()
        return DatabaseUnavailableError(
            f"operations database unavailable: {lines[0] if lines else type(exc).__name__}"
        )
    return None
