"""The embedded default, end to end: a SQLite operations database, real files on this machine,
the real sensors and the real job, and a table of what was packaged.

Everything lives under ``.ccat/demo`` in the working directory. Running it again packages only
what is new (nothing, unless files were added), so the table stays the same.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ccat_packaging.db import make_engine, session_scope
from ccat_packaging.local_run import tick_and_run
from ccat_packaging.models import (
    Base,
    DiskDataLocation,
    ExecutedObsUnit,
    Instrument,
    InstrumentModule,
    LocationType,
    RawDataFile,
    RawDataFilePhysicalCopy,
    RawDataPackage,
    RawDataPackagePhysicalCopy,
    Site,
    StorageType,
)

MB = 1_000_000


@dataclass(frozen=True)
class DemoPaths:
    root: Path

    @property
    def ops_db_url(self) -> str:
        return f"sqlite:///{self.root / 'ops_db.sqlite'}"

    @property
    def dagster_home(self) -> Path:
        return self.root / "dagster_home"

    @property
    def instruments(self) -> Path:
        return self.root / "instruments"

    @property
    def buffers(self) -> Path:
        return self.root / "buffers"


# (instrument, its SOURCE location, modules, executed obs units, files per group)
INSTRUMENTS = [
    ("Prime-Cam", "primecam_raw_data", ["mod280", "mod350", "mod850"], 4, 9),
    ("CHAI", "chai_raw_data", ["LFA", "HFA"], 4, 12),
]


def _file_size(rng: random.Random, scale: float) -> int:
    roll = rng.random()
    if roll < 0.70:
        low, high = 1 * MB, 5 * MB
    elif roll < 0.95:
        low, high = 5 * MB, 15 * MB
    else:
        low, high = 15 * MB, 30 * MB
    return int(rng.randint(low, high) * scale)


def _write_file(path: Path, size: int, rng: random.Random) -> str:
    """Incompressible content, like raw detector data; returns its sha256 for filing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with open(path, "wb") as handle:
        left = size
        while left:
            chunk = rng.randbytes(min(left, 4 * MB))
            digest.update(chunk)
            handle.write(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def seed(session: Session, paths: DemoPaths, size_scale: float, seed_value: int = 2026) -> int:
    """File a site, two SOURCE and two BUFFER locations, and a few hundred real files."""
    rng = random.Random(seed_value)
    host = "localhost"
    site = Site(name="CCAT Observatory", short_name="ccat", location="Cerro Chajnantor")
    session.add(site)
    for name, priority in (("ccat_buffer", 1), ("ccat_buffer_spare", 2)):
        root = paths.buffers / name
        root.mkdir(parents=True, exist_ok=True)
        session.add(
            DiskDataLocation(
                name=name,
                site=site,
                location_type=LocationType.BUFFER,
                storage_type=StorageType.DISK,
                priority=priority,
                host=host,
                path=str(root),
            )
        )
    files = 0
    eou_number = 0
    for instrument_name, location_name, module_names, eou_count, per_group in INSTRUMENTS:
        root = paths.instruments / location_name
        root.mkdir(parents=True, exist_ok=True)
        location = DiskDataLocation(
            name=location_name,
            site=site,
            location_type=LocationType.SOURCE,
            storage_type=StorageType.DISK,
            host=host,
            path=str(root),
        )
        instrument = Instrument(name=instrument_name)
        modules = [InstrumentModule(name=m, instrument=instrument) for m in module_names]
        session.add_all([location, instrument, *modules])
        for _ in range(eou_count):
            eou_number += 1
            eou = ExecutedObsUnit(name=f"{instrument_name} scan {eou_number:04d}")
            session.add(eou)
            session.flush()
            for module in modules:
                for index in range(per_group):
                    subdir = f"scan_{index // 4:02d}"
                    relative = f"{module.name}/eou{eou.id:04d}/{subdir}/frame_{index:03d}.fits"
                    size = _file_size(rng, size_scale)
                    checksum = _write_file(root / relative, size, rng)
                    raw = RawDataFile(
                        name=Path(relative).name,
                        relative_path=relative,
                        size=size,
                        checksum=checksum,
                        checksum_algorithm="sha256",
                        file_type="fits",
                        source_location_id=location.id,
                        executed_obs_unit_id=eou.id,
                        instrument_module_id=module.id,
                    )
                    session.add(raw)
                    session.flush()
                    session.add(
                        RawDataFilePhysicalCopy(
                            raw_data_file_id=raw.id, data_location_id=location.id
                        )
                    )
                    files += 1
    return files


def package_table(session: Session) -> list[tuple[str, int, int, str, str, str]]:
    rows = session.execute(
        select(
            RawDataPackage,
            func.count(RawDataFile.id),
            DiskDataLocation.path,
        )
        .join(RawDataFile, RawDataFile.raw_data_package_id == RawDataPackage.id)
        .outerjoin(
            RawDataPackagePhysicalCopy,
            RawDataPackagePhysicalCopy.raw_data_package_id == RawDataPackage.id,
        )
        .outerjoin(
            DiskDataLocation, DiskDataLocation.id == RawDataPackagePhysicalCopy.data_location_id
        )
        .group_by(RawDataPackage.id, DiskDataLocation.path)
        .order_by(RawDataPackage.name)
    ).all()
    return [
        (
            package.name,
            int(count),
            package.size or 0,
            package.checksum or "-",
            package.status.value,
            str(Path(root) / package.relative_path) if root else "-",
        )
        for package, count, root in rows
    ]


def print_table(rows: list[tuple[str, int, int, str, str, str]]) -> None:
    header = ("package", "files", "bytes", "sha256", "status", "path")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def run(root: Path, reset: bool = False, size_scale: float = 1.0) -> int:
    """Seed (first time only), tick every sensor, run every request; returns an exit code."""
    started = time.monotonic()
    paths = DemoPaths(root.resolve())
    if reset and paths.root.exists():
        shutil.rmtree(paths.root)
    paths.root.mkdir(parents=True, exist_ok=True)
    paths.dagster_home.mkdir(parents=True, exist_ok=True)
    # Sensors, ops and the code location all read the operations database from here.
    os.environ["CCAT_OPS_DB_URL"] = paths.ops_db_url
    engine = make_engine(paths.ops_db_url)
    Base.metadata.create_all(engine)
    with session_scope(engine) as session:
        if session.scalar(select(func.count(Site.id))) == 0:
            filed = seed(session, paths, size_scale)
            print(f"filed {filed} raw files under {paths.instruments}")
    seeded_at = time.monotonic()

    from ccat_packaging.definitions import defs

    with dg.DagsterInstance.from_config(str(paths.dagster_home)) as instance:
        outcomes = tick_and_run(defs(), instance, log_level="WARNING")
    launched = [o for o in outcomes if o.run_id]
    failed = [o for o in launched if not o.success]
    with session_scope(engine) as session:
        rows = package_table(session)
    engine.dispose()
    print_table(rows)
    total = sum(r[2] for r in rows)
    print(
        f"\n{len(rows)} packages, {total / MB:.1f} MB; this run launched {len(launched)} "
        f"run(s), {len(failed)} failed; seeding {seeded_at - started:.1f} s, packaging "
        f"{time.monotonic() - seeded_at:.1f} s, total {time.monotonic() - started:.1f} s"
    )
    for outcome in failed:
        print(f"FAILED: {outcome.partition_key} run {outcome.run_id} (see `make ui`)")
    return 1 if failed else 0
