"""The README's demo command, small: real CLI, real files, real sensors and job, run twice."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from sqlalchemy import select

from ccat_packaging.db import make_engine, session_scope
from ccat_packaging.models import RawDataFile, RawDataPackage, Status


def _demo(root: Path) -> str:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "ccat_packaging.cli",
            "demo",
            "--root",
            str(root),
            "--size-scale",
            "0.01",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=root.parent,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_demo_packages_every_file_and_a_second_run_creates_nothing(tmp_path: Path) -> None:
    root = tmp_path / "demo"
    first = _demo(root)
    assert "filed 204 raw files" in first
    assert "20 packages" in first and "launched 20 run(s), 0 failed" in first
    engine = make_engine(f"sqlite:///{root / 'ops_db.sqlite'}")
    with session_scope(engine) as s:
        packages = s.scalars(select(RawDataPackage)).all()
        files = s.scalars(select(RawDataFile)).all()
        assert {p.status for p in packages} == {Status.COMPLETED}
        assert all(f.raw_data_package_id is not None for f in files)
        for package in packages:
            tar = root / "buffers" / "ccat_buffer" / package.relative_path
            listed = subprocess.run(
                ["tar", "-tf", str(tar)], capture_output=True, text=True, check=True
            ).stdout.split()
            filed = sorted(f.relative_path for f in files if f.raw_data_package_id == package.id)
            assert sorted(listed) == filed
            digest = subprocess.run(
                ["sha256sum", str(tar)], capture_output=True, text=True, check=True
            ).stdout.split()[0]
            assert digest == package.checksum
    engine.dispose()
    second = _demo(root)
    assert "launched 0 run(s)" in second and "20 packages" in second
    table = [line for line in first.splitlines() if "__part" in line]
    assert table == [line for line in second.splitlines() if "__part" in line]
