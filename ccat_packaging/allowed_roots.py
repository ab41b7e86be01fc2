"""Which directories packaging may read and write on each host: the deployment's word, not the
operations database's.

A location row names a host and a root, and whoever can write the operations database could
point a SOURCE at the worker's own home (``host=localhost``, ``path=/root``) and have its SSH
key archived into a package and shipped. ``CCAT_ALLOWED_ROOTS`` confines each host to the roots
the deployment allows: ``host=/abs/path`` entries separated by commas, ``*`` for any host, e.g.
``*=/data/ccat,primecam-ic1=/srv/raw``. A location whose root is not one of them, or under one,
is refused before its host is contacted. Unset, nothing is confined (the embedded default); the
production set-up sets it (docs/operations.md). Roots are compared as written after ``..`` and
``.`` are resolved: an allowed root must not itself be, or lie under, a symlink to elsewhere.
"""

from __future__ import annotations

import posixpath

from ccat_packaging import settings
from ccat_packaging.errors import ConfigurationError
from ccat_packaging.plans import Endpoint


def parse(raw: str) -> list[tuple[str, str]]:
    """(host, root) pairs of ``CCAT_ALLOWED_ROOTS``; a malformed entry is an error, never
    ignored (an entry silently dropped would confine less than the operator meant)."""
    pairs = []
    for entry in filter(None, (part.strip() for part in raw.split(","))):
        host, equals, root = entry.partition("=")
        if not equals or not host.strip() or not root.startswith("/"):
            raise ConfigurationError(
                f"CCAT_ALLOWED_ROOTS entry {entry!r} is not host=/absolute/path ('*' for any host)"
            )
        pairs.append((host.strip().lower(), posixpath.normpath(root)))
    return pairs


def check(endpoint: Endpoint) -> None:
    """Refuse a location whose root the deployment does not allow on its host."""
    raw = settings.allowed_roots()
    if not raw:
        return
    root = posixpath.normpath(endpoint.root)
    host = endpoint.host.strip().lower()
    allowed = [r for h, r in parse(raw) if h in ("*", host)]
    if any(root == r or root.startswith(r.rstrip("/") + "/") for r in allowed):
        return
    raise ConfigurationError(
        f"location {endpoint.location_name!r} on {endpoint.host}: its root {endpoint.root!r} "
        f"is outside the roots this deployment allows there ({', '.join(allowed) or 'none'}; "
        "CCAT_ALLOWED_ROOTS); correct the location's path, or allow the root if it is meant"
    )
