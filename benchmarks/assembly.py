"""Assembly throughput and memory: the job's assembly step against what the machine allows.

Two data sets, both cold (page cache dropped before every timed run) and fsync included:
``large`` (a few files of 640 MiB) and ``small`` (20,000 files of 25-75 KB in 100 directories).
Each round runs every method once, in an order rotated from round to round, so ratios compare
runs made side by side:

- raw copy limit: ``cat`` the files into one file, fsync it;
- shell pipeline: ``tar -cf - --format=gnu ... | tee out | openssl dgst -sha256``, fsync;
- naive multi-pass: tar to a staging file, ``sha256sum`` it, copy it to the buffer, fsync;
- the job's assembly step, ``archive.assemble``: locally, and over SSH to a loopback sshd, in
  place (source and buffer on that host) and streamed (source host -> worker -> buffer host);
  each without and with filed sha256 checksums, which the assembler verifies in the same pass.

Memory: the agent process (``tar_agent.py build``, as run on a source host) and a worker process
(Dagster imported, assembling in-process) package the large set and a 10+ GB group made of hard
links to it; their peak RSS (VmHWM) must not grow with the package.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import random
import shutil
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import (
    AGENT_PYTHON,
    REPO,
    TIMES,
    PeakRss,
    Row,
    Section,
    drop_caches,
    log,
    median,
)
from ccat_packaging.assembly import archive, tar_agent
from ccat_packaging.plans import Endpoint, PackagePlan
from ccat_packaging.resources import AssemblyHosts
from ccat_packaging_tests.sshd import SshServer, keygen, running_sshd

BLOCK = 16 << 20
PAGE = 4096


@dataclass
class DataSet:
    name: str
    root: Path
    members: list[tuple[str, int]]
    sha256: dict[str, str]
    list_file: Path = field(init=False)

    def __post_init__(self) -> None:
        self.list_file = self.root.parent / f"{self.name}.list"
        self.list_file.write_bytes(b"".join(os.fsencode(m) + b"\0" for m, _ in self.members))

    @property
    def payload(self) -> int:
        return sum(size for _, size in self.members)

    def filed(self) -> tuple[tuple[str, str, str], ...]:
        return tuple((path, "sha256", self.sha256[path]) for path, _ in self.members)


class _Stamped:
    """A random block written over and over, with a counter stamped into every 4 KiB page so
    that no two pages on disk are the same (nothing can deduplicate or compress them)."""

    def __init__(self, seed: int) -> None:
        self.block = bytearray(random.Random(seed).randbytes(BLOCK))
        self.counter = 0

    def next(self, size: int) -> memoryview:
        for offset in range(0, size, PAGE):
            struct.pack_into("<Q", self.block, offset, self.counter)
            self.counter += 1
        return memoryview(self.block)[:size]


def _write(path: Path, size: int, source: _Stamped, digest: hashlib._Hash) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        left = size
        while left:
            chunk = source.next(min(left, BLOCK))
            handle.write(chunk)
            digest.update(chunk)
            left -= len(chunk)


def make_large(root: Path, files: int, file_size: int) -> DataSet:
    source, members, sums = _Stamped(1), [], {}
    for i in range(files):
        name = f"scan_{i:02d}/frame.fits"
        digest = hashlib.sha256()
        _write(root / name, file_size, source, digest)
        members.append((name, file_size))
        sums[name] = digest.hexdigest()
    os.sync()
    return DataSet("large", root, members, sums)


def make_small(root: Path, files: int, directories: int) -> DataSet:
    source, members, sums = _Stamped(2), [], {}
    sizes = random.Random(3)
    for i in range(files):
        name = f"d{i % directories:03d}/f{i // directories:05d}.dat"
        members.append((name, sizes.randint(25_000, 75_000)))
    members.sort(key=lambda m: os.fsencode(m[0]))
    for name, size in members:  # written in archive order, as an instrument would write them
        digest = hashlib.sha256()
        _write(root / name, size, source, digest)
        sums[name] = digest.hexdigest()
    os.sync()
    return DataSet("small", root, members, sums)


def hard_linked(large: DataSet, root: Path, links: int) -> DataSet:
    """A big group without writing its data again: hard links to the large set's files. The
    assembler drops what it read from the page cache, so every link is read from disk again."""
    members, sums = [], {}
    for i in range(links):
        original, size = large.members[i % len(large.members)]
        name = f"part_{i:02d}/frame.fits"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        os.link(large.root / original, root / name)
        members.append((name, size))
        sums[name] = large.sha256[original]
    return DataSet(f"linked{links}", root, members, sums)


# ---------------------------------------------------------------------------------------------
# Methods: each runs once on cold caches and returns (seconds of the step, extra timings).


def _shell(script: str, cwd: Path | None = None) -> None:
    subprocess.run(["bash", "-c", "set -euo pipefail\n" + script], check=True, cwd=cwd)


def _q(path: Path) -> str:
    return "'" + str(path).replace("'", "'\\''") + "'"


@dataclass
class Lab:
    """Where outputs go, and the SSH "hosts" on loopback addresses."""

    out: Path
    a: SshServer
    b: SshServer
    key: Path
    known_hosts: Path
    agent_dir: Path  # where the agent is uploaded, instead of ~/.cache on the "remote" hosts

    def hosts(self) -> AssemblyHosts:
        """Resources that reach the lab: its settings are this process's environment."""
        os.environ["CCAT_SSH_KEY_FILE"] = str(self.key)
        os.environ["CCAT_SSH_KNOWN_HOSTS"] = str(self.known_hosts)
        os.environ["CCAT_SSH_REMOTE_DIR"] = str(self.agent_dir)
        return AssemblyHosts()


def _here(root: Path, name: str) -> Endpoint:
    return Endpoint(1, name, "localhost", None, 22, str(root))


Method = Callable[[DataSet, Lab], dict[str, float]]


def raw_copy(data: DataSet, lab: Lab) -> dict[str, float]:
    out = lab.out / "copy.out"
    started = time.perf_counter()
    _shell(f"xargs -0 -a {_q(data.list_file)} cat > {_q(out)}\nsync {_q(out)}", cwd=data.root)
    return {"seconds": time.perf_counter() - started}


def cold_read(data: DataSet, lab: Lab) -> dict[str, float]:
    """What the disk reads: the files, in order, into /dev/null."""
    started = time.perf_counter()
    _shell(f"xargs -0 -a {_q(data.list_file)} cat > /dev/null", cwd=data.root)
    return {"seconds": time.perf_counter() - started}


def direct_write(data: DataSet, lab: Lab) -> dict[str, float]:
    """What the disk writes: the payload's size of random data from memory, with O_DIRECT
    (no page cache at all), then fsync."""
    block = mmap.mmap(-1, 8 << 20)  # page-aligned, as O_DIRECT wants
    block.write(random.Random(4).randbytes(len(block)))
    fd = os.open(lab.out / "direct.out", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
    try:
        started = time.perf_counter()
        left = data.payload
        while left > 0:
            left -= os.write(fd, block)
        os.fsync(fd)
        return {"seconds": time.perf_counter() - started}
    finally:
        os.close(fd)
        block.close()


def shell_pipeline(data: DataSet, lab: Lab) -> dict[str, float]:
    out = lab.out / "pipeline.tar"
    started = time.perf_counter()
    _shell(
        f"tar -cf - --format=gnu -C {_q(data.root)} --null -T {_q(data.list_file)}"
        f" | tee {_q(out)} | openssl dgst -sha256 > /dev/null\nsync {_q(out)}"
    )
    return {"seconds": time.perf_counter() - started}


def naive(data: DataSet, lab: Lab) -> dict[str, float]:
    stage, out = lab.out / "staging" / "stage.tar", lab.out / "naive.tar"
    stage.parent.mkdir(exist_ok=True)
    started = time.perf_counter()
    _shell(
        f"tar -cf {_q(stage)} --format=gnu -C {_q(data.root)} --null -T {_q(data.list_file)}\n"
        f"sha256sum {_q(stage)} > /dev/null\ncp {_q(stage)} {_q(out)}\nsync {_q(out)}"
    )
    return {"seconds": time.perf_counter() - started}


def ours(where: str, checksums: bool) -> Method:
    """``archive.assemble`` as the job calls it, with a fresh ``AssemblyHosts`` (a run's
    connections are its own); then ``archive.verify``, timed on its own."""

    def method(data: DataSet, lab: Lab) -> dict[str, float]:
        if where == "local":
            source, buffer = _here(data.root, "src"), _here(lab.out / "buffer", "buf")
        elif where == "ssh":
            source, buffer = lab.a.endpoint(data.root, "src"), lab.a.endpoint(lab.out / "buffer")
        else:  # streamed: source host a -> this worker -> buffer host b
            source, buffer = lab.a.endpoint(data.root, "src"), lab.b.endpoint(lab.out / "buffer")
        Path(buffer.root).mkdir(exist_ok=True)
        plan = PackagePlan(
            1,
            "bench",
            "bench__eou1__mod1",
            1,
            "bench/bench.tar",
            source,
            1,
            tuple(data.members),
            data.filed() if checksums else (),
        )
        hosts = lab.hosts()
        try:
            started = time.perf_counter()
            built = archive.assemble(hosts, plan, buffer)
            seconds = time.perf_counter() - started
            archive.verify(hosts, plan, built)
            verify_seconds = time.perf_counter() - started - seconds
            archive.discard(hosts, built)
        finally:
            hosts.close()
        return {
            "seconds": seconds,
            "agent": built.seconds,  # the agent's own time, without connecting and starting it
            "verify": verify_seconds,
            "checksum": _tag(built.checksum),
        }

    return method


def _tag(checksum: str) -> float:
    return float(int(checksum[:12], 16))  # to check that every way built the same bytes


METHODS: dict[str, Method] = {
    "raw copy limit (cat, fsync)": raw_copy,
    "shell pipeline (tar|tee|openssl)": shell_pipeline,
    "naive multi-pass (tar; sha256sum; cp)": naive,
    "ours, local": ours("local", False),
    "ours, local, filed sha256 checked": ours("local", True),
    "ours, SSH in place": ours("ssh", False),
    "ours, SSH in place, filed sha256 checked": ours("ssh", True),
    "ours, SSH streamed source->worker->buffer": ours("stream", False),
    "disk alone: cold read of the files (cat > /dev/null)": cold_read,
    "disk alone: write from memory, O_DIRECT, fsync": direct_write,
}
RAW, PIPE, NAIVE = list(METHODS)[:3]
LOCAL, LOCAL_CK, SSH, SSH_CK, STREAM, READ, WRITE = list(METHODS)[3:]


def _clean(out: Path) -> None:
    for entry in out.iterdir():
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def measure(data: DataSet, lab: Lab, rounds: int) -> dict[str, list[dict[str, float]]]:
    results: dict[str, list[dict[str, float]]] = {name: [] for name in METHODS}
    names = list(METHODS)
    for round_number in range(rounds):
        shift = round_number % len(names)
        for name in names[shift:] + names[:shift]:
            _clean(lab.out)
            drop_caches()
            result = METHODS[name](data, lab)
            results[name].append(result)
            log(
                f"  {data.name} round {round_number + 1}: {name}: "
                f"{data.payload / result['seconds'] / 1e6:,.0f} MB/s"
            )
        _clean(lab.out)
    checksums = {
        r["checksum"] for name in (LOCAL, LOCAL_CK, SSH, SSH_CK, STREAM) for r in results[name]
    }
    if len(checksums) != 1:
        raise RuntimeError(f"{data.name}: the ways of assembling built different archives")
    return results


def rows_for(data: DataSet, results: dict[str, list[dict[str, float]]], cold: bool) -> list[Row]:
    label = (
        f"assembly {data.name}: {len(data.members):,} files, {data.payload / 1e9:.2f} GB"
        f"{', cold' if cold else ''}"
    )
    rounds = len(results[RAW])

    def rate(name: str) -> float:
        return median([data.payload / r["seconds"] / 1e6 for r in results[name]])

    def ratio(name: str, baseline: str) -> float:  # per round, side by side; then the median
        return median(
            [
                b["seconds"] / r["seconds"]
                for r, b in zip(results[name], results[baseline], strict=True)
            ]
        )

    raw_target = 0.7 if data.name == "large" else 0.8
    rows = [Row(label, RAW, rate(RAW), "MB/s", note=f"{rounds} round(s)")]
    rows.append(Row(label, PIPE, rate(PIPE), "MB/s", "raw copy", ratio(PIPE, RAW)))
    rows.append(Row(label, NAIVE, rate(NAIVE), "MB/s", "raw copy", ratio(NAIVE, RAW)))
    for name in (LOCAL, LOCAL_CK):
        rows.append(Row(label, name, rate(name), "MB/s", "raw copy", ratio(name, RAW), raw_target))
        if data.name == "large":
            rows.append(Row(label, name, rate(name), "MB/s", "pipeline", ratio(name, PIPE), 1.1))
        rows.append(Row(label, name, rate(name), "MB/s", "naive", ratio(name, NAIVE), 2.0))
    for name, local in ((SSH, LOCAL), (SSH_CK, LOCAL_CK)):
        fixed = median([r["seconds"] - r["agent"] for r in results[name]])
        agent = median([data.payload / r["agent"] / 1e6 for r in results[name]])
        rows.append(
            Row(
                label,
                name,
                rate(name),
                "MB/s",
                "local",
                ratio(name, local),
                0.8,
                note=f"the agent on the host: {agent:,.0f} MB/s; fixed SSH cost per package "
                f"(connect, check the agent, open a session, start it): {fixed:.2f} s",
            )
        )
    rows.append(
        Row(
            label,
            STREAM,
            rate(STREAM),
            "MB/s",
            "local",
            ratio(STREAM, LOCAL),
            note="every byte crosses two SSH connections through this worker",
        )
    )
    for name in (READ, WRITE):
        rows.append(
            Row(label, name, rate(name), "MB/s", note="for reference: what the disk does alone")
        )
    verify = median([r["verify"] for r in results[LOCAL]])
    rows.append(Row(label, "verify step after the local build (headers only)", verify, "s"))
    return rows


# ---------------------------------------------------------------------------------------------
# Memory


WORKER = """
import json, sys, time
from ccat_packaging.assembly import archive
from ccat_packaging.plans import Endpoint, PackagePlan
from ccat_packaging.resources import AssemblyHosts
import ccat_packaging.definitions  # everything a run worker has loaded
spec = json.loads(sys.argv[1])
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
before = status("VmHWM")
here = lambda root: Endpoint(1, "x", "localhost", None, 22, root)
plan = PackagePlan(1, "m", "m", 1, "m/m.tar", here(spec["source"]), 1,
                   tuple(tuple(m) for m in spec["members"]), tuple(tuple(f) for f in spec["filed"]))
hosts = AssemblyHosts()
started = time.perf_counter()
built = archive.assemble(hosts, plan, here(spec["buffer"]))
seconds = time.perf_counter() - started
archive.discard(hosts, built)
print(json.dumps({"before_kib": before, "peak_kib": status("VmHWM"), "seconds": seconds}))
"""


def agent_peak(data: DataSet, buffer: Path) -> tuple[int, float]:
    """Peak RSS (KiB) of ``tar_agent.py build`` run by the system python, as on a source host."""
    spec = buffer / "spec.json"
    spec.write_text(
        json.dumps(
            {
                "source_root": str(data.root),
                "members": data.members,
                "dest_root": str(buffer),
                "dest_relative": "agent/m.tar",
                "checksums": {p: ["sha256", s] for p, s in data.sha256.items()},
            }
        )
    )
    command = [AGENT_PYTHON, "-I", "-S", tar_agent.__file__, "build", str(spec)]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    sampler = PeakRss(process.pid)
    out, _ = process.communicate()
    peak = sampler.stop()
    seconds = time.perf_counter() - started
    result = json.loads(out.splitlines()[-1])
    if "ok" not in result:
        raise RuntimeError(f"agent failed: {result}")
    os.unlink(result["ok"]["temp_path"])
    return peak, seconds


def worker_peak(data: DataSet, buffer: Path) -> tuple[int, int, float]:
    spec = {
        "source": str(data.root),
        "buffer": str(buffer),
        "members": data.members,
        "filed": data.filed(),
    }
    out = subprocess.run(
        [sys.executable, "-c", WORKER, json.dumps(spec)],
        check=True,
        capture_output=True,
        text=True,
        cwd=REPO,
    ).stdout
    result = json.loads(out.splitlines()[-1])
    return int(result["before_kib"]), int(result["peak_kib"]), float(result["seconds"])


def ssh_peak(data: DataSet, lab: Lab) -> tuple[int, float]:
    """Peak RSS (KiB) of the agent that an SSH in-place assembly starts on the source host (here
    a loopback sshd), and the assembly step's seconds."""
    plan = PackagePlan(
        1,
        "m",
        "m",
        1,
        "ssh/m.tar",
        lab.a.endpoint(data.root, "src"),
        1,
        tuple(data.members),
        data.filed(),
    )
    hosts = lab.hosts()
    done: dict[str, Any] = {}

    def work() -> None:
        started = time.perf_counter()
        try:
            done["built"] = archive.assemble(hosts, plan, lab.a.endpoint(lab.out, "buf"))
        except BaseException as exc:
            done["error"] = exc
        done["seconds"] = time.perf_counter() - started

    thread = threading.Thread(target=work)
    thread.start()
    sampler: PeakRss | None = None
    while thread.is_alive():
        if sampler is None and (pid := _remote_agent_pid()) is not None:
            sampler = PeakRss(pid, interval=0.02)
        time.sleep(0.01)
    thread.join()
    try:
        if "error" in done:
            raise done["error"]
        archive.discard(hosts, done["built"])
    finally:
        hosts.close()
    if sampler is None:
        raise RuntimeError("the agent started over SSH was never seen running")
    return sampler.stop(), float(done["seconds"])


def _remote_agent_pid() -> int | None:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                command = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if b"tar_agent-" in command and b"build" in command:
                return int(entry)
    return None


def memory_rows(sets: list[DataSet], lab: Lab) -> list[Row]:
    """Each package is built three ways, each from a cold cache, with filed sha256 checked."""
    rows: list[Row] = []
    peaks: dict[str, list[float]] = {"agent": [], "worker": [], "ssh": []}
    seconds: dict[str, float] = {}
    for data in sets:
        label = f"memory: {len(data.members):,} files, {data.payload / 1e9:.1f} GB"
        size = f"{data.payload / 1e9:.1f} GB"

        def rate(value: float) -> str:
            return f"{data.payload / value / 1e6:,.0f} MB/s"  # noqa: B023 (used at once)

        log(f"memory: {size}: the agent process, started as on a source host")
        _clean(lab.out)
        drop_caches()
        peak, seconds["agent"] = agent_peak(data, lab.out)
        peaks["agent"].append(peak / 1024)
        rows.append(
            Row(
                label,
                "peak RSS: the agent process (tar_agent.py build)",
                peak / 1024,
                "MB",
                target=200,
                at_most=True,
                note=rate(seconds["agent"]),
            )
        )
        log(f"memory: {size}: a worker process assembling in-process")
        _clean(lab.out)
        drop_caches()
        before, peak, seconds["worker"] = worker_peak(data, lab.out)
        peaks["worker"].append(peak / 1024)
        rows.append(
            Row(
                label,
                "peak RSS: a run worker assembling locally (Dagster loaded)",
                peak / 1024,
                "MB",
                target=200,
                at_most=True,
                note=f"{rate(seconds['worker'])}; {(peak - before) / 1024:.0f} MB above the "
                f"{before / 1024:.0f} MB it had before assembling",
            )
        )
        log(f"memory: {size}: SSH in place")
        _clean(lab.out)
        drop_caches()
        peak, seconds["ssh"] = ssh_peak(data, lab)
        peaks["ssh"].append(peak / 1024)
        rows.append(
            Row(
                label,
                "peak RSS: the agent an SSH assembly starts on the host",
                peak / 1024,
                "MB",
                target=200,
                at_most=True,
                note=rate(seconds["ssh"]),
            )
        )
        _clean(lab.out)
    rows.append(
        Row(
            label,
            "ours, SSH in place, filed sha256 checked",
            data.payload / seconds["ssh"] / 1e6,
            "MB/s",
            "local",
            seconds["worker"] / seconds["ssh"],
            0.8,
            note="the largest package, one round, against the local worker's build above",
        )
    )
    for who, values in peaks.items():
        rows.append(
            Row(
                "memory: growth with package size",
                f"{who}: peak RSS building {sets[-1].payload / 1e9:.1f} GB over "
                f"{sets[0].payload / 1e9:.1f} GB",
                values[-1] / values[0],
                TIMES,
                target=1.1,
                at_most=True,
            )
        )
    return rows


# ---------------------------------------------------------------------------------------------


@contextmanager
def ssh_lab(scratch: Path, out: Path) -> Iterator[Lab]:
    scratch.mkdir()
    key = scratch / "client_ed25519"
    public = keygen(key)
    with ExitStack() as stack:
        a = stack.enter_context(running_sshd("127.0.0.2", scratch / "host_a", [public]))
        b = stack.enter_context(running_sshd("127.0.0.3", scratch / "host_b", [public]))
        known_hosts = scratch / "known_hosts"
        known_hosts.write_text(f"{a.known_hosts_line}\n{b.known_hosts_line}\n")
        yield Lab(out, a, b, key, known_hosts, scratch / "agent")


@dataclass
class Sizes:
    large_files: int = 4
    large_file_size: int = 512 << 20
    small_files: int = 20_000
    small_directories: int = 100
    memory_links: int = 20
    rounds: int = 2


def run(scratch: Path, sizes: Sizes, throughput: bool = True, memory: bool = True) -> list[Section]:
    started = time.perf_counter()
    cold = drop_caches()
    log("assembly: writing the data sets")
    scratch.mkdir()
    large = make_large(scratch / "large", sizes.large_files, sizes.large_file_size)
    out = scratch / "out"
    out.mkdir()
    sections = []
    with ssh_lab(scratch / "ssh", out) as lab:
        if throughput:
            small = make_small(scratch / "small", sizes.small_files, sizes.small_directories)
            section = Section("Assembly throughput")
            for data in (large, small):
                log(f"assembly: {data.name}, {sizes.rounds} round(s) of {len(METHODS)} methods")
                results = measure(data, lab, sizes.rounds)
                section.rows += rows_for(data, results, cold)
            section.seconds = time.perf_counter() - started
            sections.append(section)
            shutil.rmtree(small.root)
        if memory:
            started = time.perf_counter()
            linked = hard_linked(large, scratch / "linked", sizes.memory_links)
            section = Section("Memory of the assembly process")
            section.rows = memory_rows([large, linked], lab)
            section.seconds = time.perf_counter() - started
            sections.append(section)
    return sections
