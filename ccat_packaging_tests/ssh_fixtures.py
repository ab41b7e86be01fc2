"""Pytest fixtures for the SSH tests (loaded with ``pytest_plugins``): the lab of two hosts."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from typing import Any

import pytest

from ccat_packaging.resources import AssemblyHosts
from ccat_packaging_tests.sshd import SSHD, MakeHosts, SshLab, keygen, running_sshd


def _require_sshd() -> None:
    if not os.access(SSHD, os.X_OK):
        pytest.fail(f"{SSHD} is missing: run scripts/test-setup.sh (installs openssh-server)")
    if os.geteuid() != 0:
        pytest.fail("the SSH tests start sshd and log in as root: run them as root")


@pytest.fixture(scope="session")
def ssh_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshLab]:
    """Started once per test session; tests that kill a server start their own."""
    _require_sshd()
    directory = tmp_path_factory.mktemp("ssh_lab")
    client_key = directory / "client_ed25519"
    public = keygen(client_key)
    with (
        running_sshd("127.0.0.2", directory / "host_a", [public]) as a,
        running_sshd("127.0.0.3", directory / "host_b", [public]) as b,
    ):
        known_hosts = directory / "known_hosts"
        known_hosts.write_text(f"{a.known_hosts_line}\n{b.known_hosts_line}\n")
        yield SshLab(directory, a, b, client_key, known_hosts)
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def make_hosts(ssh_lab: SshLab, monkeypatch: pytest.MonkeyPatch) -> Iterator[MakeHosts]:
    """``AssemblyHosts`` for the lab with some settings changed, closed after the test. The
    settings are the environment's (for the rest of the test), read at the first SSH use."""
    made: list[AssemblyHosts] = []

    def make(**settings: Any) -> AssemblyHosts:
        for name, value in ssh_lab.environment(**settings).items():
            if value is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, value)
        made.append(AssemblyHosts())
        return made[-1]

    yield make
    for resource in made:
        resource.close()
