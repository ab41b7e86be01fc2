"""The resources take what decides security from the deployment's environment only: no run
config can change or drop it, and no secret shows in a repr, the run's config, tags or logs."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from sqlalchemy import func, select

from ccat_packaging.assembly.ssh import SshSettings
from ccat_packaging.definitions import defs
from ccat_packaging.models import LocationType, RawDataPackage
from ccat_packaging.names import job_name, partitions_name
from ccat_packaging.plans import Endpoint
from ccat_packaging.resources import AssemblyHosts, OpsDatabase, ssh_settings
from ccat_packaging_tests.package_checks import packages_of
from ccat_packaging_tests.sshd import keygen

PASSPHRASE = "pass-phrase-s3cret"
DB_PASSWORD = "db-s3cret"

# What a launchpad user could try: trust any host, check keys against a file they wrote, log in
# with another key, run another interpreter or agent, point the run at another database, or
# tune a harmless field and so drop the environment's key and known-hosts file.
ATTACKS: dict[str, dict[str, Any]] = {
    "trust any host": {"assembly_hosts": {"trust_unknown_hosts": True}},
    "own known hosts": {"assembly_hosts": {"known_hosts": "/tmp/attacker_known_hosts"}},
    "own key": {"assembly_hosts": {"key_filename": "/tmp/attacker_key"}},
    "own interpreter": {"assembly_hosts": {"remote_python": "/tmp/evil/python3"}},
    "own agent directory": {"assembly_hosts": {"remote_dir": "/tmp/evil"}},
    "a timeout only": {"assembly_hosts": {"connect_timeout": 5}},
    "another database": {"ops_db": {"url": "sqlite:////tmp/attacker.sqlite"}},
}


def _run_config(attack: dict[str, Any]) -> dict[str, Any]:
    return {"resources": {name: {"config": config} for name, config in attack.items()}}


@pytest.mark.parametrize("attack", ATTACKS)
def test_run_config_cannot_change_or_drop_the_deployments_settings(world, attack: str) -> None:
    """The launchpad sends run config through the same check as ``execute_in_process``: it
    is refused before any step runs, and nothing is packaged."""
    site = world.site()
    source = world.location(site, "src", LocationType.SOURCE)
    world.location(site, "buf", LocationType.BUFFER)
    group = world.group(source)
    world.file_bytes(group, "frame.fits")
    key = f"src__eou{group.eou_id}__mod{group.module_id}"
    job = defs().resolve_job_def(job_name("src"))
    run_config = _run_config(ATTACKS[attack])
    [(resource, config)] = ATTACKS[attack].items()
    [field] = config
    with pytest.raises(dg.DagsterInvalidConfigError) as invalid:
        dg.validate_run_config(job, run_config)
    assert f'unexpected config entry "{field}"' in str(invalid.value)
    assert f"root:resources:{resource}:config" in str(invalid.value)
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(partitions_name("src"), [key])
        with pytest.raises(dg.DagsterInvalidConfigError, match="unexpected config entry"):
            job.execute_in_process(instance=instance, partition_key=key, run_config=run_config)
        assert instance.get_runs() == []
    with world.session() as s:
        assert s.scalar(select(func.count()).select_from(RawDataPackage)) == 0


def test_the_ssh_settings_are_the_environments(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "CCAT_SSH_KEY_FILE": "/etc/ccat/id_ed25519",
        "CCAT_SSH_KEY_PASSPHRASE": PASSPHRASE,
        "CCAT_SSH_KNOWN_HOSTS": "/etc/ccat/known_hosts",
        "CCAT_SSH_TRUST_UNKNOWN_HOSTS": "yes",
        "CCAT_SSH_CONNECT_TIMEOUT_SECONDS": "7",
        "CCAT_SSH_REMOTE_PYTHON": "/opt/python3/bin/python3",
        "CCAT_SSH_REMOTE_DIR": "/var/lib/ccat-agent",
        "CCAT_STALL_SECONDS": "40",
    }.items():
        monkeypatch.setenv(name, value)
    assert ssh_settings() == SshSettings(
        stall_seconds=40,
        key_filename="/etc/ccat/id_ed25519",
        key_passphrase=PASSPHRASE,
        known_hosts="/etc/ccat/known_hosts",
        trust_unknown_hosts=True,
        connect_timeout=7,
        remote_python="/opt/python3/bin/python3",
        remote_dir="/var/lib/ccat-agent",
    )
    for value in ("", "0", "no", "on"):
        monkeypatch.setenv("CCAT_SSH_TRUST_UNKNOWN_HOSTS", value)
        assert not ssh_settings().trust_unknown_hosts


@pytest.fixture
def secret_env(world, monkeypatch: pytest.MonkeyPatch) -> None:
    """The world's database under a URL with its password in every place a driver takes one
    (trust auth lets it in), and a key passphrase in the environment."""
    base, database = world.url.rsplit("/", 1)
    url = (
        base.replace("postgres@", f"postgres:{DB_PASSWORD}@")
        + f"/{database}?password={DB_PASSWORD}&sslpassword={DB_PASSWORD}"
    )
    monkeypatch.setenv("CCAT_OPS_DB_URL", url)
    monkeypatch.setenv("CCAT_SSH_KEY_PASSPHRASE", PASSPHRASE)


def test_no_repr_of_the_resources_or_settings_shows_a_secret(secret_env: None) -> None:
    """As an op sees them, set up by Dagster, after the database was used and a runner for
    an SSH host made."""
    seen: list[str] = []

    @dg.op
    def probe(ops_db: OpsDatabase, assembly_hosts: AssemblyHosts) -> None:
        with ops_db.session():
            pass
        runner = assembly_hosts.runner_for(Endpoint(1, "far", "127.0.0.9", "root", 22, "/data"))
        seen.extend(repr(x) for x in (ops_db, assembly_hosts, runner, ops_db.engine))
        seen.extend(str(x) for x in (ops_db, assembly_hosts, ops_db.engine.url))
        seen.extend([repr(ssh_settings()), str(ssh_settings())])

    @dg.job
    def probing() -> None:
        probe()

    result = probing.execute_in_process(
        resources={"ops_db": OpsDatabase(), "assembly_hosts": AssemblyHosts()}
    )
    assert result.success and seen
    for text in seen:
        assert PASSPHRASE not in text and DB_PASSWORD not in text, text


@pytest.mark.parametrize("source_at", ["this machine", "an SSH host, key not opened"])
def test_a_run_keeps_every_secret_out_of_its_config_tags_and_events(
    world,
    secret_env: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    source_at: str,
) -> None:
    """A run that packages, and one that fails on a key its passphrase does not open: the
    failure's message, the package's reason and everything the run stored or logged hold
    neither the passphrase nor the database password."""
    site = world.site()
    if source_at == "this machine":
        source = world.location(site, "src", LocationType.SOURCE)
    else:
        keygen(tmp_path / "locked", passphrase="another one")
        monkeypatch.setenv("CCAT_SSH_KEY_FILE", str(tmp_path / "locked"))
        source = world.location(site, "src", LocationType.SOURCE, host="127.0.0.9")
    world.location(site, "buf", LocationType.BUFFER)
    group = world.group(source)
    world.file_bytes(group, "frame.fits")
    key = f"src__eou{group.eou_id}__mod{group.module_id}"
    caplog.set_level(logging.DEBUG)
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(partitions_name("src"), [key])
        job = defs().resolve_job_def(job_name("src"))
        result = job.execute_in_process(instance=instance, partition_key=key, raise_on_error=False)
        run = instance.get_run_by_id(result.run_id)
        assert run is not None
        records = instance.all_logs(result.run_id)
        stored = [dg.serialize_value(run), *(dg.serialize_value(r) for r in records)]
    [package] = packages_of(world)
    if source_at == "this machine":
        assert result.success
    else:
        assert not result.success
        assert (package.failure_reason or "").startswith("ConfigurationError: ")
        assert "cannot load the SSH key file" in (package.failure_reason or "")
    assert len(records) > 10
    for text in [*stored, caplog.text, package.failure_reason or ""]:
        assert DB_PASSWORD not in text and PASSPHRASE not in text
