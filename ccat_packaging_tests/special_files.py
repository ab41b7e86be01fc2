"""Files that are not regular files, made for real at a path: what an instrument computer's
directory may hold by mistake, and what assembly must refuse without ever opening it."""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Callable
from pathlib import Path


def _socket(path: Path) -> None:
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))  # the socket file stays after the socket is closed


SPECIAL: dict[str, Callable[[Path], None]] = {
    "named pipe": os.mkfifo,
    "socket": _socket,
    "character device": lambda path: os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 3)),
    # A loop device's number: opening it would act on whatever it is attached to.
    "block device": lambda path: os.mknod(path, 0o600 | stat.S_IFBLK, os.makedev(7, 0)),
}
