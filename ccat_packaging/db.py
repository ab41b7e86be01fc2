"""Engine and session helpers for the operations database."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    InterfaceError,
    OperationalError,
    SQLAlchemyError,
)
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
    # Query parameters reach the driver as connect arguments instead, so that no repr of the
    # engine or its URL shows them: SQLAlchemy hides only the password before the host, and
    # a driver takes credentials there too. ``host`` stays, for SQLAlchemy's multi-host form.
    connect_args = {name: value for name, value in parsed.query.items() if name != "host"}
    return create_engine(
        parsed.difference_update_query(connect_args),
        connect_args=connect_args,
        pool_pre_ping=True,
    )


def redacted(url: str) -> str:
    """The URL as it may appear in logs, messages and the UI: driver, user, host, port,
    database and the names of its query parameters. The password is hidden, and so is every
    query value, since drivers take credentials there under many names (``password``,
    ``sslpassword``, ``passfile``, ...). A host with an ``@`` in it is the rest of a password
    that holds an unencoded ``@``, and a URL that does not parse may be a password typed in
    the wrong place: neither is shown."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        return "<unparseable URL>"
    hidden = parsed.set(query={})
    if parsed.host and "@" in parsed.host:
        hidden = hidden.set(host="***")
    query = "&".join(f"{name}=***" for name in parsed.query)
    return hidden.render_as_string(hide_password=True) + (f"?{query}" if query else "")


def failure(url: str, exc: SQLAlchemyError) -> str:
    """One line on an error of the database at ``url``: its redacted URL, the error's class
    and the first line of its message (driver messages name host, port and options, never a
    password; the lines after it hold statements and their parameters)."""
    lines = str(exc).strip().splitlines()
    return f"{redacted(url)}: {type(exc).__name__}: {lines[0] if lines else 'no message'}"


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
