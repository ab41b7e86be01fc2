"""What every benchmark shares: the machine's description, cold caches, scratch space that is
always cleaned up, peak-memory sampling, and the rows of the result table."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg2

REPO = Path(__file__).resolve().parents[1]
SCRATCH_PARENT = Path(os.environ.get("BENCH_SCRATCH", "/var/tmp"))
PG_DSN = os.environ.get("BENCH_PG_DSN", "host=127.0.0.1 port=5432 user=postgres dbname=postgres")
TIMES = "\u00d7"  # the multiplication sign, written so that no linter mistakes it for an x
AGENT_PYTHON = "/usr/bin/python3"  # what the SSH hosts run the agent with (the default setting)
PG_URL = os.environ.get("BENCH_PG_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432")


@dataclass
class Row:
    """One line of the result table. ``ratio`` is against ``baseline``, measured in the same run;
    ``target`` is the lowest (or, with ``at_most``, highest) acceptable value of ``ratio``, or of
    ``value`` when there is no baseline."""

    benchmark: str
    measure: str
    value: float
    unit: str
    baseline: str = ""
    ratio: float | None = None
    target: float | None = None
    at_most: bool = False
    note: str = ""

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        checked = self.ratio if self.ratio is not None else self.value
        return checked <= self.target if self.at_most else checked >= self.target

    def cells(self) -> list[str]:
        ratio = f"{self.ratio:.2f}{TIMES} {self.baseline}" if self.ratio is not None else ""
        if self.target is None:
            target = ""
        else:
            sign = "≤" if self.at_most else "≥"
            suffix = TIMES if self.ratio is not None else f" {self.unit}"
            target = f"{sign} {self.target:g}{suffix}"
        met = {None: "", True: "yes", False: "**no**"}[self.met]
        return [self.benchmark, self.measure, f"{_fmt(self.value)} {self.unit}", ratio, target, met]


def _fmt(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


@dataclass
class Section:
    """A benchmark's rows, plus text for the report (query plans, details)."""

    title: str
    rows: list[Row] = field(default_factory=list)
    details: list[str] = field(default_factory=list)
    seconds: float = 0.0


HEADER = ["benchmark", "measure", "value", "ratio (same run)", "target", "met"]


def markdown_table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row.cells()) + " |" for row in rows]
    return "\n".join(lines)


def text_table(rows: list[Row]) -> str:
    cells = [HEADER] + [[c.replace("**", "") for c in row.cells()] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(HEADER))]
    out = []
    for n, row in enumerate(cells):
        out.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def median(values: list[float]) -> float:
    return statistics.median(values)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def require_root() -> None:
    if os.geteuid() != 0:
        sys.exit("the benchmarks drop the page cache and start sshd: run them as root")


def drop_caches() -> bool:
    """Write back and drop the page cache, so every timed run reads cold; False if not allowed."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


@contextlib.contextmanager
def scratch_dir(label: str) -> Iterator[Path]:
    """A directory under SCRATCH_PARENT, removed however the block ends."""
    path = Path(tempfile.mkdtemp(prefix=f"ccat-bench-{label}-", dir=SCRATCH_PARENT))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def scratch_database(label: str) -> Iterator[str]:
    """A new PostgreSQL database (its name is yielded), dropped however the block ends."""
    name = f"ccat_bench_{label}_{os.getpid()}"
    admin = psycopg2.connect(PG_DSN)
    admin.autocommit = True
    try:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            cur.execute(f'CREATE DATABASE "{name}"')
        yield name
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def database_url(name: str) -> str:
    return f"{PG_URL}/{name}"


def status_kib(pid: int, field_name: str) -> int | None:
    """A ``VmRSS``/``VmHWM`` line of /proc/<pid>/status, in KiB; None once the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakRss:
    """Samples a process's peak RSS (VmHWM, the kernel's own high-water mark) until it exits."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    def _run(self, interval: float) -> None:
        while not self._stop.is_set():
            value = status_kib(self.pid, "VmHWM")
            if value is None:
                return
            self.peak_kib = max(self.peak_kib, value)
            self._stop.wait(interval)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak_kib


def _first_line(command: list[str]) -> str:
    try:
        out = subprocess.run(command, capture_output=True, text=True, check=False).stdout
    except OSError:
        return "?"
    return out.strip().splitlines()[0] if out.strip() else "?"


def machine() -> list[tuple[str, str]]:
    """What the numbers were measured on."""
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    mem_kib = status_meminfo("MemTotal")
    disk = shutil.disk_usage(SCRATCH_PARENT)
    device = " ".join(
        _first_line(["findmnt", "-n", "-o", "SOURCE,FSTYPE,OPTIONS", "-T", str(SCRATCH_PARENT)])
        .replace(",", ", ")
        .split()
    )
    return [
        ("CPU", f"{os.cpu_count()} {TIMES} {cpu}{' (SHA-NI)' if ' sha_ni' in flags else ''}"),
        ("RAM", f"{mem_kib / 1024 / 1024:.1f} GiB"),
        ("scratch disk", f"{device}; {disk.free / 1e9:.0f} of {disk.total / 1e9:.0f} GB free"),
        ("kernel", platform.release()),
        (
            "Python",
            f"{platform.python_version()}; the agent over SSH: {_first_line([AGENT_PYTHON, '-V'])}",
        ),
        ("OpenSSL", ssl.OPENSSL_VERSION),
        (
            "tools",
            f"{_first_line(['tar', '--version'])}; {_first_line(['sha256sum', '--version'])}; "
            f"{_first_line(['openssl', 'version'])}",
        ),
        ("PostgreSQL", _pg_version()),
    ]


def status_meminfo(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _pg_version() -> str:
    try:
        with psycopg2.connect(PG_DSN) as conn, conn.cursor() as cur:
            cur.execute("SHOW server_version")
            row = cur.fetchone()
            return str(row[0]) if row else "?"
    except psycopg2.Error:
        return "not reachable"
