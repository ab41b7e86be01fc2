"""The SOURCE locations of the last load that could read them, kept beside the instance.

The code location reads its locations from the operations database once per load. Without
this copy, a database outage at that moment (a code server restarting during maintenance)
would load no sensor and no job at all, and nothing would say when to reload. With it, the
same sensors load; their ticks fail visibly (``DatabaseUnavailableError``) until the database
answers again, and then they simply work. A location added meanwhile needs a reload, as always.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import TypedDict

from ccat_packaging.discovery import SourceLocationRef

LOG = logging.getLogger(__name__)


class LocationJson(TypedDict):
    id: int
    name: str
    slug: str
    host: str
    run_queue: str


def path() -> Path | None:
    """``$DAGSTER_HOME/ccat_source_locations.json``; None without an instance directory."""
    home = os.environ.get("DAGSTER_HOME")
    return Path(home) / "ccat_source_locations.json" if home else None


def save(locations: list[SourceLocationRef]) -> None:
    """Replace the copy atomically: a load that dies while writing leaves the previous one."""
    target = path()
    if target is None:
        return
    rows = [
        LocationJson(id=r.id, name=r.name, slug=r.slug, host=r.host, run_queue=r.run_queue)
        for r in locations
    ]
    try:
        fd, temp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(rows, handle)
        os.replace(temp, target)
    except OSError as exc:  # the load itself succeeded; only the fallback is missing
        LOG.warning(f"cannot keep the SOURCE locations in {target}: {exc}")


def load() -> list[SourceLocationRef] | None:
    """The copy, or None if there is none (never loaded with the database up)."""
    target = path()
    if target is None or not target.exists():
        return None
    rows: list[LocationJson] = json.loads(target.read_text(encoding="utf-8"))
    return [
        SourceLocationRef(r["id"], r["name"], r["slug"], r["host"], r["run_queue"]) for r in rows
    ]
