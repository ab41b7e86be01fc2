"""The ``ccat-packaging`` command: with a password in ``CCAT_OPS_DB_URL`` neither its output
nor its errors show it; sizes and durations read the way operators write them."""

from __future__ import annotations

import argparse
from datetime import timedelta

import pytest

from ccat_packaging.cli import _duration, _size, main

SECRET = "s3cr3t"
COMMANDS = [["init-db"], ["status"], ["list"], ["dry-run"], ["requeue", "--all"], ["verify", "pkg"]]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_a_database_that_refuses_the_connection_is_one_line_without_the_password(
    command: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(
        "CCAT_OPS_DB_URL",
        f"postgresql+psycopg2://postgres:{SECRET}@127.0.0.1:1/ops"
        f"?password={SECRET}&sslpassword={SECRET}",
    )
    assert main(command) == 1
    out, err = capsys.readouterr()
    assert out.startswith(
        "error: operations database postgresql+psycopg2://postgres:***@127.0.0.1:1/ops"
        "?password=***&sslpassword=***: OperationalError: "
    )
    assert "Connection refused" in out and out.count("\n") == 1
    assert SECRET not in out + err


def test_its_output_names_the_database_without_the_password(
    pg_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    base, database = pg_url.rsplit("/", 1)  # trust auth: any password is let in
    url = f"{base.replace('postgres@', f'postgres:{SECRET}@')}/{database}?password={SECRET}"
    monkeypatch.setenv("CCAT_OPS_DB_URL", url)
    for command in COMMANDS[:5]:
        assert main(command) == 0
    out, err = capsys.readouterr()
    assert f"tables ready in postgresql+psycopg2://postgres:***@127.0.0.1:5432/{database}" in out
    assert SECRET not in out + err


@pytest.mark.parametrize(
    ("size", "shown"),
    [(None, "-"), (999, "999 B"), (1000, "1.0 kB"), (1_300_000_000, "1.3 GB"), (2e18, "2000.0 PB")],
)
def test_sizes_are_shown_in_decimal_units(size: int | None, shown: str) -> None:
    assert _size(None if size is None else int(size)) == shown


def test_durations_are_minutes_hours_or_days() -> None:
    assert _duration("90m") == timedelta(minutes=90)
    assert _duration("2h") == timedelta(hours=2)
    assert _duration("1.5d") == timedelta(hours=36)
    with pytest.raises(argparse.ArgumentTypeError, match="not a duration like 90m, 2h or 3d"):
        _duration("2 weeks")
