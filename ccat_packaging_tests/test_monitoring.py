"""The backlog over time: ``record_backlog`` on a real Dagster instance records every location
as numeric asset metadata (what the UI's Plots tab draws) and in a real InfluxDB server; free
space comes from buffers on this machine and over SSH, and a buffer host that does not answer
costs its own number only, within the probe's bound."""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest

from ccat_packaging import monitoring, names
from ccat_packaging.definitions import defs
from ccat_packaging.models import DiskDataLocation, LocationType
from ccat_packaging_tests.influxdb_server import InfluxServer
from ccat_packaging_tests.sshd import SshLab

pytest_plugins = ["ccat_packaging_tests.influxdb_fixtures", "ccat_packaging_tests.ssh_fixtures"]

NUMBERS = {
    "unpackaged_files",
    "unpackaged_bytes",
    "oldest_unpackaged_age_seconds",
    "completed_last_hour",
    "failed_last_hour",
    "failed",
}


@pytest.fixture
def silent_host() -> Iterator[tuple[str, int]]:
    """An SSH "host" that accepts connections and never says a word."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.6", 0))
        listener.listen(8)
        yield "127.0.0.6", int(listener.getsockname()[1])


def test_record_backlog_records_every_location_even_when_a_buffer_host_is_silent(
    world,
    influxdb: InfluxServer,
    silent_host: tuple[str, int],
    ssh_lab: SshLab,
    small_disk: Path,
    monkeypatch,
) -> None:
    influxdb.env(monkeypatch)
    for name, setting in ssh_lab.environment().items():
        if setting is not None:
            monkeypatch.setenv(name, setting)
    monkeypatch.setattr(monitoring, "FREE_SPACE_BOUND_SECONDS", 2)
    here, there = world.site(), world.site("cologne")
    src = world.location(here, "src", LocationType.SOURCE)
    world.location(here, "buf", LocationType.BUFFER, root=small_disk)
    world.location(there, "far src", LocationType.SOURCE)
    host, port = silent_host
    world.location(there, "far buf", LocationType.BUFFER, host=host, port=port)
    remote = ssh_lab.a
    world.location(
        there,
        "ssh buf",
        LocationType.BUFFER,
        host=remote.address,
        port=remote.port,
        user="root",
        root=small_disk,
        priority=2,
    )
    group = world.group(src)
    world.file(group, "a.dat", size=1234, write=False)
    world.file(group, "b.dat", size=766, write=False)

    definitions = defs()
    schedule = definitions.resolve_schedule_def(names.BACKLOG_SCHEDULE)
    assert schedule.cron_schedule == "*/5 * * * *"
    assert schedule.default_status == dg.DefaultScheduleStatus.RUNNING
    job = definitions.resolve_job_def(names.BACKLOG_JOB)
    with dg.instance_for_test() as instance:
        started = time.monotonic()
        result = job.execute_in_process(instance=instance)
        took = time.monotonic() - started
        assert result.success
        warnings = [
            e.user_message for e in instance.all_logs(result.run_id) if e.level == logging.WARNING
        ]
        recorded = {
            slug: instance.fetch_materializations(names.backlog_asset(slug), limit=5).records
            for slug in ("src", "far_src")
        }
    assert took < 12  # the silent host's probe gave up after its 2 s bounds (not 15 s or 300 s)
    [warning] = warnings
    assert warning.startswith(f"free space of buffer far buf on {host} not known:")

    [near_record], [far_record] = recorded["src"], recorded["far_src"]
    near = near_record.asset_materialization
    far = far_record.asset_materialization
    assert near is not None and far is not None
    numbers = {k: v for k, v in near.metadata.items() if k in NUMBERS}
    assert set(numbers) == NUMBERS
    for key, value in numbers.items():
        expected = dg.FloatMetadataValue if key.endswith("_seconds") else dg.IntMetadataValue
        assert isinstance(value, expected), key
    assert near.metadata["unpackaged_files"] == dg.IntMetadataValue(2)
    assert near.metadata["unpackaged_bytes"] == dg.IntMetadataValue(2000)
    vfs = os.statvfs(small_disk)
    free = near.metadata["buffer_free_bytes[buf]"]
    assert free == dg.IntMetadataValue(vfs.f_bavail * vfs.f_frsize)
    assert near.metadata["problems"] == dg.TextMetadataValue("none")
    assert set(k for k in far.metadata if k in NUMBERS) == NUMBERS
    # Over SSH, the agent on that host measured the same file system (the lab is this machine).
    assert [k for k in far.metadata if k.startswith("buffer_free_bytes")] == [
        "buffer_free_bytes[ssh buf]"
    ]
    assert far.metadata["buffer_free_bytes[ssh buf]"] == free
    problems = far.metadata["problems"]
    assert isinstance(problems, dg.TextMetadataValue)
    assert str(problems.text).startswith(f"buffer far buf on {host}: ")

    backlog = {r["source_location"]: r for r in influxdb.query('SELECT * FROM "packaging_backlog"')}
    assert set(backlog) == {"src", "far src"}
    for location, materialization in [("src", near), ("far src", far)]:
        row = backlog[location]
        assert {k: row[k] for k in NUMBERS} == {
            k: materialization.metadata[k].value for k in NUMBERS
        }
    buffers = influxdb.query('SELECT * FROM "packaging_buffer"')
    assert sorted(
        (b["buffer_location"], b["buffer_host"], b["free_bytes"], b["total_bytes"]) for b in buffers
    ) == [
        ("buf", "localhost", free.value, 64 << 20),
        ("ssh buf", remote.address, free.value, 64 << 20),
    ]


def test_a_location_retired_since_the_load_is_left_out_with_a_warning(world) -> None:
    site = world.site()
    world.location(site, "kept", LocationType.SOURCE)
    retired = world.location(site, "retired", LocationType.SOURCE)
    world.location(site, "buf", LocationType.BUFFER)
    job = defs().resolve_job_def(names.BACKLOG_JOB)
    with world.session() as s:
        s.get_one(DiskDataLocation, retired).active = False
    with dg.instance_for_test() as instance:
        result = job.execute_in_process(instance=instance)
        assert result.success
        warnings = [
            e.user_message for e in instance.all_logs(result.run_id) if e.level == logging.WARNING
        ]
        kept = instance.fetch_materializations(names.backlog_asset("kept"), limit=5).records
        gone = instance.fetch_materializations(names.backlog_asset("retired"), limit=5).records
    assert len(kept) == 1 and gone == []
    assert warnings == [
        "retired: no longer an active SOURCE location; its backlog is not recorded (reload the "
        "code location to drop its asset)"
    ]
