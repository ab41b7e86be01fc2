"""What claiming hands to assembly: the package to build and the locations involved.

A plan is fixed when its files are claimed, so later steps never re-derive it from a database
that may have changed meanwhile. It names no buffer: which buffer takes the package is decided
at assembly time (``buffer_choice``), and the assembled archive names the one actually used.
"""

from __future__ import annotations

from dataclasses import dataclass

from ccat_packaging.models import DiskDataLocation


@dataclass(frozen=True)
class Endpoint:
    """A disk location as the assembly step needs it: where, on which host, as whom."""

    location_id: int
    location_name: str
    host: str
    user: str | None
    port: int
    root: str

    @classmethod
    def of(cls, location: DiskDataLocation) -> Endpoint:
        return cls(
            location.id, location.name, location.host, location.user, location.port, location.path
        )


@dataclass(frozen=True)
class PackagePlan:
    """One package of a file group: its record, its source and its members in archive order."""

    package_id: int
    name: str
    group_key: str
    part: int
    relative_path: str
    source: Endpoint
    source_site_id: int
    members: tuple[tuple[str, int], ...]
    # (relative_path, algorithm, checksum) of the members filed with a checksum
    filed_checksums: tuple[tuple[str, str, str], ...] = ()

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.members)

    def checksum_spec(self) -> dict[str, list[str]]:
        """The filed checksums as the tar agent takes them: the bytes archived must match."""
        return {path: [algorithm, value] for path, algorithm, value in self.filed_checksums}
