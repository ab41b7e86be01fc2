"""SQLAlchemy models of the part of the operations database that packaging reads and writes.

Names follow the operations-database concepts (``ccat_ops_db``) so that code and queries read
like the domain. Only the columns packaging needs are modelled; enum values are the exact
strings the operations database uses.
"""

from __future__ import annotations

import enum
import uuid
from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    Uuid,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def _utcnow() -> datetime:
    return datetime.now(UTC)


class LocationType(enum.StrEnum):
    SOURCE = "source"
    BUFFER = "buffer"
    LONG_TERM_ARCHIVE = "long_term_archive"
    PROCESSING = "processing"


class StorageType(enum.StrEnum):
    DISK = "disk"
    S3 = "s3"
    TAPE = "tape"


class Status(enum.StrEnum):
    PENDING = "pending"
    SCHEDULED = "scheduled"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"


class PhysicalCopyStatus(enum.StrEnum):
    PRESENT = "present"
    STAGED = "staged"
    DELETION_SCHEDULED = "deletion_scheduled"
    DELETION_IN_PROGRESS = "deletion_in_progress"
    DELETION_POSSIBLE = "deletion_possible"
    DELETION_FAILED = "deletion_failed"
    DELETED = "deleted"


def _enum_column(enum_cls: type[enum.Enum]) -> Enum:
    # Stored as the lower-case value in a VARCHAR with a CHECK constraint: portable between
    # SQLite and PostgreSQL and readable in psql.
    return Enum(
        enum_cls,
        values_callable=lambda members: [m.value for m in members],
        native_enum=False,
        length=32,
        validate_strings=True,
    )


class Base(DeclarativeBase):
    pass


class Site(Base):
    __tablename__ = "site"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    short_name: Mapped[str] = mapped_column(String(32), unique=True)
    location: Mapped[str] = mapped_column(String(256), default="")

    data_locations: Mapped[list[DataLocation]] = relationship(back_populates="site")


class DataLocation(Base):
    """Where data can be stored within a site; polymorphic on the storage type."""

    __tablename__ = "data_location"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    site_id: Mapped[int] = mapped_column(ForeignKey("site.id"))
    location_type: Mapped[LocationType] = mapped_column(_enum_column(LocationType))
    storage_type: Mapped[StorageType] = mapped_column(_enum_column(StorageType))
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    # 1 is preferred; ties are broken by id (see buffer_choice).
    priority: Mapped[int] = mapped_column(Integer, default=1)

    site: Mapped[Site] = relationship(back_populates="data_locations")

    __mapper_args__ = {"polymorphic_on": "storage_type"}
    __table_args__ = (Index("ix_data_location_site_type", "site_id", "location_type"),)


class DiskDataLocation(DataLocation):
    """A directory tree on a host reachable over SSH (or this machine)."""

    __tablename__ = "disk_data_location"

    id: Mapped[int] = mapped_column(ForeignKey("data_location.id"), primary_key=True)
    host: Mapped[str] = mapped_column(String(255))
    user: Mapped[str | None] = mapped_column(String(64), nullable=True)
    path: Mapped[str] = mapped_column(String(1024))
    port: Mapped[int] = mapped_column(Integer, default=22)

    __mapper_args__ = {"polymorphic_identity": StorageType.DISK}


class S3DataLocation(DataLocation):
    """Mapped so rows of this type load; packaging refuses to use them."""

    __mapper_args__ = {"polymorphic_identity": StorageType.S3}


class TapeDataLocation(DataLocation):
    """Mapped so rows of this type load; packaging refuses to use them."""

    __mapper_args__ = {"polymorphic_identity": StorageType.TAPE}


class Instrument(Base):
    __tablename__ = "instrument"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)

    modules: Mapped[list[InstrumentModule]] = relationship(back_populates="instrument")


class InstrumentModule(Base):
    __tablename__ = "instrument_module"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    instrument_id: Mapped[int] = mapped_column(ForeignKey("instrument.id"))
    name: Mapped[str] = mapped_column(String(64))

    instrument: Mapped[Instrument] = relationship(back_populates="modules")
    __table_args__ = (UniqueConstraint("instrument_id", "name"),)


class ExecutedObsUnit(Base):
    """One executed observation; its files are packaged per instrument module."""

    __tablename__ = "executed_obs_unit"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    start_time: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class RawDataPackage(Base):
    """One tar archive of (part of) a file group, built once and never rewritten."""

    __tablename__ = "raw_data_package"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    relative_path: Mapped[str] = mapped_column(String(1024))
    size: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    checksum: Mapped[str | None] = mapped_column(String(128), nullable=True)
    checksum_algorithm: Mapped[str | None] = mapped_column(String(32), nullable=True)
    status: Mapped[Status] = mapped_column(_enum_column(Status), default=Status.PENDING)
    retry_count: Mapped[int] = mapped_column(Integer, default=0)
    failure_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    # The run working on the package; its lease lasts while ``updated_at`` (the heartbeat) is
    # fresh, so a dead run's package can be taken over and a live run's never is.
    lease_owner: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # The group the package came from, and its part number within that group.
    source_location_id: Mapped[int] = mapped_column(ForeignKey("data_location.id"))
    executed_obs_unit_id: Mapped[int] = mapped_column(ForeignKey("executed_obs_unit.id"))
    instrument_module_id: Mapped[int] = mapped_column(ForeignKey("instrument_module.id"))
    part: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_utcnow)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=_utcnow, onupdate=_utcnow
    )

    files: Mapped[list[RawDataFile]] = relationship(back_populates="raw_data_package")
    source_location: Mapped[DataLocation] = relationship()

    __table_args__ = (
        UniqueConstraint(
            "source_location_id",
            "executed_obs_unit_id",
            "instrument_module_id",
            "part",
            name="uq_raw_data_package_group_part",
        ),
        Index("ix_raw_data_package_status", "status"),
    )


class RawDataFile(Base):
    """A file an instrument wrote to a SOURCE location; UUID because filing may happen offline."""

    __tablename__ = "raw_data_file"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(255))
    relative_path: Mapped[str] = mapped_column(String(1024))
    size: Mapped[int] = mapped_column(BigInteger)
    checksum: Mapped[str | None] = mapped_column(String(128), nullable=True)
    checksum_algorithm: Mapped[str | None] = mapped_column(String(32), nullable=True)
    file_type: Mapped[str] = mapped_column(String(32), default="")
    source_location_id: Mapped[int] = mapped_column(ForeignKey("data_location.id"))
    executed_obs_unit_id: Mapped[int] = mapped_column(ForeignKey("executed_obs_unit.id"))
    instrument_module_id: Mapped[int] = mapped_column(ForeignKey("instrument_module.id"))
    # A file belongs to at most one package: claiming is a conditional UPDATE of this column.
    raw_data_package_id: Mapped[int | None] = mapped_column(
        ForeignKey("raw_data_package.id"), nullable=True
    )
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_utcnow)

    raw_data_package: Mapped[RawDataPackage | None] = relationship(back_populates="files")

    __table_args__ = (
        UniqueConstraint("source_location_id", "relative_path", name="uq_raw_data_file_path"),
        # Discovery reads only unpackaged files; the partial indexes keep that cheap however
        # many packaged files a season accumulates. This one serves the grouping (and claiming a
        # group): in group order, with the size included so a full scan never visits the table.
        Index(
            "ix_raw_data_file_unpackaged",
            "source_location_id",
            "executed_obs_unit_id",
            "instrument_module_id",
            "created_at",
            postgresql_where=text("raw_data_package_id IS NULL"),
            postgresql_include=["size"],
            sqlite_where=text("raw_data_package_id IS NULL"),
        ),
        # This one finds the files filed since a sensor's cursor, so a tick when little changed
        # costs as little as what changed, not the whole backlog.
        Index(
            "ix_raw_data_file_unpackaged_filed",
            "source_location_id",
            "created_at",
            postgresql_where=text("raw_data_package_id IS NULL"),
            sqlite_where=text("raw_data_package_id IS NULL"),
        ),
        Index("ix_raw_data_file_package", "raw_data_package_id"),
    )


class RawDataPackagePhysicalCopy(Base):
    __tablename__ = "raw_data_package_physical_copy"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    raw_data_package_id: Mapped[int] = mapped_column(ForeignKey("raw_data_package.id"))
    data_location_id: Mapped[int] = mapped_column(ForeignKey("data_location.id"))
    status: Mapped[PhysicalCopyStatus] = mapped_column(
        _enum_column(PhysicalCopyStatus), default=PhysicalCopyStatus.PRESENT
    )
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_utcnow)

    raw_data_package: Mapped[RawDataPackage] = relationship()
    data_location: Mapped[DataLocation] = relationship()

    __table_args__ = (UniqueConstraint("raw_data_package_id", "data_location_id"),)


class RawDataFilePhysicalCopy(Base):
    """Filed together with the file by the instrument; packaging never changes it."""

    __tablename__ = "raw_data_file_physical_copy"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    raw_data_file_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("raw_data_file.id"))
    data_location_id: Mapped[int] = mapped_column(ForeignKey("data_location.id"))
    status: Mapped[PhysicalCopyStatus] = mapped_column(
        _enum_column(PhysicalCopyStatus), default=PhysicalCopyStatus.PRESENT
    )

    __table_args__ = (UniqueConstraint("raw_data_file_id", "data_location_id"),)
