"""Child processes that must not outlive whoever started them.

Each is started as the leader of a process group of its own, so a Ctrl-C at the terminal
reaches only the parent, which then stops the whole group (``stop_group``): a
``dagster-daemon`` with its code servers and their run workers, or a webserver. The demo, its
UI command and the tests all start and stop Dagster's processes this way.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import IO


def start_group(
    argv: list[str], env: dict[str, str], cwd: Path, out: IO[bytes] | None = None
) -> subprocess.Popen[bytes]:
    """``argv`` as the leader of a new session (and so process group); ``out`` is a file
    for its stdout and stderr, None for the parent's."""
    return subprocess.Popen(
        argv,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=subprocess.STDOUT if out is not None else None,
        start_new_session=True,
    )


def stop_group(process: subprocess.Popen[bytes], grace: float = 20.0) -> None:
    """SIGTERM to the whole group, SIGKILL to whatever is left after ``grace`` seconds."""
    stop_groups([process], grace)


def stop_groups(processes: list[subprocess.Popen[bytes]], grace: float = 20.0) -> None:
    """``stop_group`` for several groups at once: they shut down side by side."""
    groups = {process.pid: process for process in processes}
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        for group in groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            for process in groups.values():
                process.poll()
            if not any(live_members(group) for group in groups):
                return
            time.sleep(0.2)
    left = {group: live_members(group) for group in groups}
    raise RuntimeError(f"processes survived SIGKILL: {left}")


def live_members(group: int) -> list[int]:
    """Processes of a process group that are not zombies (an orphaned zombie waits for
    whoever reaps orphans here, and holds nothing)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        if int(pgrp) == group and state != "Z":
            members.append(int(stat.parent.name))
    return members
