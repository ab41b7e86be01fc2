"""The ``ccat-packaging`` command: with a password in ``CCAT_OPS_DB_URL`` neither its output
nor its errors show it; sizes and durations read the way operators write them."""

from __future__ import annotations

import argparse
from datetime import timedelta
from pathlib import Path

import pytest

from ccat_packaging.cli import _duration, _size, main
from ccat_packaging.db import make_engine
from ccat_packaging.models import Base

SECRET = "s3cr3t"
COMMANDS = [
    ["init-db"],
    ["status"],
    ["list"],
    ["dry-run"],
    ["requeue", "--all"],
    ["verify", "pkg"],
    ["backfill", "src"],
]


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


def test_help_names_the_database_setting_and_its_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        main(["--help"])
    assert capsys.readouterr().out.endswith(
        "CCAT_OPS_DB_URL: the operations database\n"
        f"  default: sqlite:///{tmp_path}/.ccat/ops_db.sqlite\n"
        f"  when that file is missing, after `make demo`: sqlite:///{tmp_path}/.ccat/demo/"
        "ops_db.sqlite\n"
        "CCAT_DAGSTER_URL: the webserver `backfill` and `requeue --launch` launch through\n"
        "  default: http://127.0.0.1:3000; DAGSTER_HOME: the deployment's Dagster instance\n"
    )


def test_reading_a_missing_database_is_one_line_and_creates_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CCAT_OPS_DB_URL", raising=False)
    for command in COMMANDS[1:]:
        assert main(command) == 1
        assert capsys.readouterr().out == (
            f"error: operations database sqlite:///{tmp_path}/.ccat/ops_db.sqlite does not "
            "exist; set CCAT_OPS_DB_URL (after `make demo`: "
            f"sqlite:///{tmp_path}/.ccat/demo/ops_db.sqlite) or create it with "
            "`ccat-packaging init-db`\n"
        )
    assert not (tmp_path / ".ccat").exists()
    monkeypatch.setenv("CCAT_OPS_DB_URL", f"sqlite:///{tmp_path}/elsewhere.sqlite")
    assert main(["list"]) == 1
    assert f"{tmp_path}/elsewhere.sqlite does not exist" in capsys.readouterr().out
    assert main(["init-db"]) == 0 and main(["list"]) == 0


def test_after_the_demo_the_command_finds_its_database_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CCAT_OPS_DB_URL", raising=False)
    demo = tmp_path / ".ccat" / "demo" / "ops_db.sqlite"
    demo.parent.mkdir(parents=True)
    engine = make_engine(f"sqlite:///{demo}")
    Base.metadata.create_all(engine)
    engine.dispose()
    assert main(["list"]) == 0
    out, err = capsys.readouterr()
    assert err == (
        f"CCAT_OPS_DB_URL is unset and sqlite:///{tmp_path}/.ccat/ops_db.sqlite does not "
        f"exist: using the demo's sqlite:///{demo}\n"
    )
    assert "0 package(s)" in out
    monkeypatch.delenv("CCAT_OPS_DB_URL")  # what the fallback set for the rest of main
    assert main(["init-db"]) == 0  # creating is never redirected to the demo's database
    assert f"tables ready in sqlite:///{tmp_path}/.ccat/ops_db.sqlite" in capsys.readouterr().out
