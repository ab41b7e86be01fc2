"""An assembly held mid-write in a process of its own, so that a test can start another
assembly into the same buffer while this one is certainly writing into it (a real write of a
small package into a tmpfs takes milliseconds, too short to race reliably).

``python -m ccat_packaging_tests.held_writer HOLD_DIR agent COMMAND SPEC`` runs the agent as
``tar_agent.py COMMAND SPEC`` does; ``... HOLD_DIR run DAGSTER_HOME KEY`` runs one packaging run
as ``run_partition_process`` does. Either way the archive's first member is written (its space
is reserved by then), then the process creates ``HOLD_DIR/held`` and goes on once
``HOLD_DIR/go`` exists, or after ``HOLD_SECONDS``. The agent's own code does the rest; unlike a
remote one it runs with the project on ``sys.path`` (not ``-I -S``), to be patched here.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from ccat_packaging.assembly import tar_agent
from ccat_packaging_tests import run_partition_process

HOLD_SECONDS = 120


def hold_after_first_member(hold_dir: Path) -> None:
    copy = tar_agent._copy_member
    held: list[str] = []

    def copy_then_hold(
        pipe: tar_agent._Pipeline,
        relative: str,
        fd: int,
        st: os.stat_result,
        check: tar_agent._MemberCheck | None,
    ) -> None:
        copy(pipe, relative, fd, st, check)
        if held:
            return
        held.append(relative)
        (hold_dir / "held").touch()
        deadline = time.monotonic() + HOLD_SECONDS
        while not (hold_dir / "go").exists() and time.monotonic() < deadline:
            time.sleep(0.01)

    tar_agent._copy_member = copy_then_hold


def main(argv: list[str]) -> int:
    hold_dir, mode, *args = argv[1:]
    hold_after_first_member(Path(hold_dir))
    if mode == "agent":
        return tar_agent.main(["tar_agent.py", *args])
    return run_partition_process.main(*args)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
