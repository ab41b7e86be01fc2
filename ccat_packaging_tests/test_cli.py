"""The ``ccat-packaging`` command with a password in ``CCAT_OPS_DB_URL``: neither its output
nor its errors show it."""

from __future__ import annotations

import pytest

from ccat_packaging.cli import main

SECRET = "s3cr3t"
COMMANDS = [["init-db"], ["status"], ["dry-run"], ["requeue", "--all"], ["verify", "pkg"]]


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
    for command in COMMANDS[:4]:
        assert main(command) == 0
    out, err = capsys.readouterr()
    assert f"tables ready in postgresql+psycopg2://postgres:***@127.0.0.1:5432/{database}" in out
    assert SECRET not in out + err
