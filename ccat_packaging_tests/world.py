"""A builder for test worlds: sites, locations with real directories, filed files on disk."""

from __future__ import annotations

import hashlib
import os
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.orm import Session

from ccat_packaging.db import make_engine, session_scope
from ccat_packaging.models import (
    DiskDataLocation,
    ExecutedObsUnit,
    Instrument,
    InstrumentModule,
    LocationType,
    RawDataFile,
    Site,
    StorageType,
)


@dataclass(frozen=True)
class Group:
    location_id: int
    eou_id: int
    module_id: int


class World:
    def __init__(self, url: str, tmp_path: Path) -> None:
        self.url = url
        self.tmp = tmp_path
        self.engine = make_engine(url)
        self._counter = 0

    def close(self) -> None:
        self.engine.dispose()

    def session(self) -> AbstractContextManager[Session]:
        return session_scope(self.engine)

    def site(self, short_name: str = "ccat") -> int:
        with self.session() as s:
            site = Site(name=f"Site {short_name}", short_name=short_name, location="test")
            s.add(site)
            s.flush()
            return site.id

    def location(
        self,
        site_id: int,
        name: str,
        location_type: LocationType,
        *,
        host: str = "localhost",
        priority: int = 1,
        active: bool = True,
        port: int = 22,
        user: str | None = None,
        root: Path | None = None,
    ) -> int:
        root = root or self.tmp / "locations" / name
        root.mkdir(parents=True, exist_ok=True)
        with self.session() as s:
            loc = DiskDataLocation(
                name=name,
                site_id=site_id,
                location_type=location_type,
                storage_type=StorageType.DISK,
                priority=priority,
                active=active,
                host=host,
                user=user,
                port=port,
                path=str(root),
            )
            s.add(loc)
            s.flush()
            return loc.id

    def root(self, location_id: int) -> Path:
        with self.session() as s:
            return Path(s.get_one(DiskDataLocation, location_id).path)

    def group(self, location_id: int, instrument: str = "Prime-Cam", module: str = "m280") -> Group:
        with self.session() as s:
            inst = s.query(Instrument).filter_by(name=instrument).one_or_none()
            if inst is None:
                inst = Instrument(name=instrument)
                s.add(inst)
                s.flush()
            mod = InstrumentModule(name=f"{module}-{self._next()}", instrument_id=inst.id)
            eou = ExecutedObsUnit(name=f"scan {self._next()}")
            s.add_all([mod, eou])
            s.flush()
            return Group(location_id, eou.id, mod.id)

    def file(
        self,
        group: Group,
        relative_path: str,
        content: bytes | None = None,
        *,
        size: int | None = None,
        write: bool = True,
    ) -> str:
        """File a raw file and put its bytes on disk. With ``write=False`` only the row is
        filed: from ``content`` if given, else with ``size`` and no filed checksum."""
        if content is None and (write or size is None):
            content = os.urandom(size if size is not None else 1000 + self._next())
        if write:
            assert content is not None
            path = self.root(group.location_id) / relative_path
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
        with self.session() as s:
            raw = RawDataFile(
                name=relative_path.rsplit("/", 1)[-1],
                relative_path=relative_path,
                size=len(content) if content is not None else size,
                checksum=hashlib.sha256(content).hexdigest() if content is not None else None,
                checksum_algorithm="sha256" if content is not None else None,
                file_type="dat",
                source_location_id=group.location_id,
                executed_obs_unit_id=group.eou_id,
                instrument_module_id=group.module_id,
            )
            s.add(raw)
            s.flush()
            return str(raw.id)

    def file_bytes(self, group: Group, relative_path: str, size: int = 3000) -> bytes:
        """File a file of random content and return that content."""
        content = os.urandom(size)
        self.file(group, relative_path, content)
        return content

    def _next(self) -> int:
        self._counter += 1
        return self._counter
