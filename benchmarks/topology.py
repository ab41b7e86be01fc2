"""Packages through the observatory's topology (``ccat_packaging_tests/topology.py``): instrument
computers and the buffer host as network namespaces, the site's worker on the buffer host.

Each round, in a random order, with the page cache dropped before each:

- **ours**: ``archive.assemble`` as the site's worker on the buffer host runs it (here in a
  probe process in that host's namespace, without Celery around it): the instrument
  computer's agent sends the archive over SSH (paramiko, host key verified), the buffer host
  writes and fsyncs it locally;
- **competitor, OpenSSH**: the same files over the same link with OpenSSH's client:
  ``ssh instr1 tar -c ... > file`` on the buffer host, fsync;
- **two at once**: ours from both instrument computers into the buffer at the same time;
- **the whole job** (claim, assemble, checksum, register: the operations database at the central
  site, over the uplink), with the uplink unshaped and shaped to 100 Mbit/s both ways, and the
  bytes the uplink carried per package.

The timed code runs inside the buffer host's namespace: ``python -m benchmarks.topology probe``.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import dagster as dg

from benchmarks.assembly import DataSet, make_large
from benchmarks.common import (
    Row,
    Section,
    database_url,
    drop_caches,
    log,
    median,
    scratch_database,
)
from ccat_packaging import names
from ccat_packaging.assembly import archive
from ccat_packaging.db import make_engine
from ccat_packaging.discovery import SourceLocationRef
from ccat_packaging.jobs import build_package_asset, build_package_job
from ccat_packaging.models import Base, LocationType
from ccat_packaging.plans import Endpoint, PackagePlan
from ccat_packaging.resources import AssemblyHosts, OpsDatabase
from ccat_packaging_tests.topology import Observatory, observatory
from ccat_packaging_tests.world import World

UPLINK_MBIT = 100


class ProbeSource(TypedDict):
    address: str
    root: str
    members: list[tuple[str, int]]


class ProbeLocation(TypedDict):
    """``SourceLocationRef``'s fields."""

    id: int
    name: str
    slug: str
    host: str
    run_queue: str


class Probe(TypedDict):
    """What the probe in the buffer host's namespace is asked to do (JSON on its stdin)."""

    mode: str  # "assemble" or "job"
    key: str
    known_hosts: str
    sources: list[ProbeSource]  # for "assemble"
    buffer_address: str
    buffer_root: str
    ops_db_url: str  # for "job"
    location: ProbeLocation | None  # for "job"
    partition: str  # for "job"


@dataclass
class Sizes:
    files: int = 4
    file_size: int = 256 << 20
    rounds: int = 5


def _probes(obs: Observatory, probes: list[Probe]) -> dict[str, float]:
    """Each probe in a process of its own on the buffer host, all at once (as the worker's
    prefork pool runs runs); the time from the first start to the last end of their work."""
    command = obs.network.hosts["buffer"].command(
        sys.executable, "-m", "benchmarks.topology", "probe"
    )
    running = [
        subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in probes
    ]
    try:
        with ThreadPoolExecutor(len(running)) as pool:  # all are fed before any is waited for
            answers = list(
                pool.map(
                    lambda pair: pair[0].communicate(json.dumps(pair[1]), timeout=1800),
                    zip(running, probes, strict=True),
                )
            )
    finally:
        for process in running:
            if process.poll() is None:
                process.kill()
                process.wait()
    for process, (_, stderr) in zip(running, answers, strict=True):
        if process.returncode != 0:
            raise RuntimeError(f"a probe failed:\n{stderr[-3000:]}")
    results = [dict(json.loads(out.splitlines()[-1])) for out, _ in answers]
    # from the first start to the last end of the timed work (not the processes' start-up)
    span = max(r["end"] for r in results) - min(r["end"] - r["seconds"] for r in results)
    return {**results[0], "seconds": span}


def _assemble_here(probe: Probe) -> dict[str, float]:
    """In the buffer host's namespace: assemble the source's package into the local buffer,
    fsynced, with a run's own connections."""
    buffer = Endpoint(2, "buffer", probe["buffer_address"], "root", 22, probe["buffer_root"])
    [source] = probe["sources"]
    name = Path(source["root"]).parent.name
    _ssh_environment(probe)
    hosts = AssemblyHosts()
    endpoint = Endpoint(1, name, source["address"], "root", 22, source["root"])
    members = tuple((path, size) for path, size in source["members"])
    plan = PackagePlan(1, name, name, 1, f"{name}/{name}.tar", endpoint, 1, members)
    try:
        started = time.perf_counter()
        archive.assemble(hosts, plan, buffer)
        return {"seconds": time.perf_counter() - started, "end": time.time()}
    finally:
        hosts.close()


def _ssh_environment(probe: Probe) -> None:
    """The probe's key and known-hosts file, as a deployment sets them: in the environment."""
    os.environ["CCAT_SSH_KEY_FILE"] = probe["key"]
    os.environ["CCAT_SSH_KNOWN_HOSTS"] = probe["known_hosts"]


def _job_here(probe: Probe) -> dict[str, float]:
    """In the buffer host's namespace: the location's packaging job for one partition, in
    process, as the worker runs it (its database across the uplink)."""
    assert probe["location"] is not None
    location = SourceLocationRef(**probe["location"])
    _ssh_environment(probe)
    os.environ["CCAT_OPS_DB_URL"] = probe["ops_db_url"]
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions(names.partitions_name(location.slug), [probe["partition"]])
        started = time.perf_counter()
        job = dg.Definitions(
            assets=[build_package_asset(location)],
            jobs=[build_package_job(location)],
            resources={"ops_db": OpsDatabase(), "assembly_hosts": AssemblyHosts()},
        ).resolve_job_def(names.job_name(location.slug))
        result = job.execute_in_process(partition_key=probe["partition"], instance=instance)
        seconds = time.perf_counter() - started
    if not result.success:
        raise RuntimeError("the packaging job failed")
    return {"seconds": seconds, "end": time.time()}


def _openssh(obs: Observatory, data: DataSet, out: Path) -> dict[str, float]:
    instr1 = obs.network.hosts["instr1"]
    script = (
        f"ssh -i {obs.client_key} -o UserKnownHostsFile={obs.known_hosts} -o BatchMode=yes "
        f"root@{instr1.address} 'tar -cf - --format=gnu -C {data.root} --null -T {data.list_file}'"
        f" > {out} && sync {out}"
    )
    started = time.perf_counter()
    subprocess.run(obs.network.hosts["buffer"].command("sh", "-c", script), check=True)
    return {"seconds": time.perf_counter() - started}


def _spread(values: list[float]) -> str:
    return f"min {min(values):.2f}, median {median(values):.2f}, max {max(values):.2f}"


def run(scratch: Path, sizes: Sizes | None = None) -> Section:
    sizes = sizes or Sizes()
    started = time.perf_counter()
    section = Section("topology")

    with (
        observatory(scratch / "observatory", prefix="ccatb", net=78) as obs,
        scratch_database("topology") as db_name,
    ):
        hosts = obs.network.hosts
        log("topology: writing the instrument computers' files")
        data = {
            name: make_large(obs.disk(name) / "raw", sizes.files, sizes.file_size)
            for name in ("instr1", "instr2")
        }
        out = obs.disk("buffer") / "out"
        out.mkdir()

        def probe(mode: str, sources: list[str], **job: Any) -> Probe:
            return Probe(
                mode=mode,
                key=str(obs.client_key),
                known_hosts=str(obs.known_hosts),
                sources=[
                    ProbeSource(
                        address=hosts[s].address, root=str(data[s].root), members=data[s].members
                    )
                    for s in sources
                ],
                buffer_address=hosts["buffer"].address,
                buffer_root=str(out),
                ops_db_url=job.get("ops_db_url", ""),
                location=job.get("location"),
                partition=job.get("partition", ""),
            )

        # The operations database for the job rows; the job reaches it over the uplink.
        url = database_url(db_name)
        engine = make_engine(url)
        Base.metadata.create_all(engine)
        engine.dispose()
        world = World(url, scratch)
        site = world.site("telescope")
        world.location(
            site,
            "telescope_buffer",
            LocationType.BUFFER,
            host=hosts["buffer"].address,
            user="root",
            root=out,
        )
        far_url = url.replace("127.0.0.1", obs.network.central)
        jobs_run = 0

        def job(shaped: bool) -> dict[str, float]:
            """A new SOURCE location on instr1's files each time (a file is filed once per
            location), with one group of all of them."""
            nonlocal jobs_run
            jobs_run += 1
            name = f"instr1_raw_{jobs_run}"
            source_id = world.location(
                site,
                name,
                LocationType.SOURCE,
                host=hosts["instr1"].address,
                user="root",
                root=data["instr1"].root,
            )
            location = ProbeLocation(
                id=source_id,
                name=name,
                slug=name,
                host=hosts["instr1"].address,
                run_queue="ccat_telescope",
            )
            group = world.group(source_id)
            for path, size in data["instr1"].members:
                world.file(group, path, write=False, size=size)
            key = f"{name}__eou{group.eou_id}__mod{group.module_id}"
            obs.network.shape("uplink", UPLINK_MBIT if shaped else None)
            before = obs.network.link_bytes()["uplink"]
            try:
                result = _probes(
                    obs,
                    [
                        probe(
                            "job",
                            [],
                            ops_db_url=far_url,
                            location=location,
                            partition=key,
                        )
                    ],
                )
            finally:
                obs.network.shape("uplink", None)
            moved = obs.network.link_bytes()["uplink"] - before
            return {**result, "uplink": moved.received + moved.sent}

        methods = {
            "ours": lambda: _probes(obs, [probe("assemble", ["instr1"])]),
            "openssh": lambda: _openssh(obs, data["instr1"], out / "openssh.tar"),
            "two": lambda: _probes(
                obs, [probe("assemble", ["instr1"]), probe("assemble", ["instr2"])]
            ),
            "job": lambda: job(False),
            "job_shaped": lambda: job(True),
        }
        results: dict[str, list[dict[str, float]]] = {name: [] for name in methods}
        order = random.Random()
        for round_number in range(sizes.rounds):
            shuffled = list(methods)
            order.shuffle(shuffled)
            for name in shuffled:
                for leftover in out.rglob("*"):
                    if leftover.is_file():
                        leftover.unlink()
                drop_caches()
                results[name].append(methods[name]())
                log(f"  topology round {round_number + 1}: {name}: {results[name][-1]}")
        world.close()

    one = data["instr1"].payload
    both = one + data["instr2"].payload

    def rates(name: str, payload: int) -> list[float]:
        return [payload / r["seconds"] / 1e6 for r in results[name]]

    def ratios(name: str, base: str, payload: int, base_payload: int) -> list[float]:
        return [
            (payload / a["seconds"]) / (base_payload / b["seconds"])
            for a, b in zip(results[name], results[base], strict=True)
        ]

    label = f"topology: instr1 -> buffer host, {one / 1e9:.2f} GB, cold, fsync"
    vs_ssh = ratios("ours", "openssh", one, one)
    two = ratios("two", "ours", both, one)
    shaped = ratios("job_shaped", "job", one, one)
    uplink = [r["uplink"] for r in results["job"] + results["job_shaped"]]
    rounds = f"{sizes.rounds} rounds, random order"
    section.rows += [
        Row(
            label,
            "competitor: OpenSSH ssh + GNU tar, same link",
            median(rates("openssh", one)),
            "MB/s",
            note=f"{rounds}; MB/s {_spread(rates('openssh', one))}",
        ),
        Row(
            label,
            "ours: built on the buffer host as its worker does, agent on instr1 over SSH",
            median(rates("ours", one)),
            "MB/s",
            "OpenSSH",
            median(vs_ssh),
            0.8,
            note=f"{rounds}; ratio {_spread(vs_ssh)}",
        ),
        Row(
            f"topology: instr1 + instr2 -> buffer host, {both / 1e9:.2f} GB",
            "ours, two packages at once (aggregate)",
            median(rates("two", both)),
            "MB/s",
            "one package",
            median(two),
            note=f"ratio {_spread(two)}",
        ),
        Row(
            label,
            "whole job, uplink unshaped",
            median(rates("job", one)),
            "MB/s",
            note=f"MB/s {_spread(rates('job', one))}",
        ),
        Row(
            label,
            f"whole job, uplink shaped to {UPLINK_MBIT} Mbit/s",
            median(rates("job_shaped", one)),
            "MB/s",
            "unshaped",
            median(shaped),
            0.9,
            note=f"ratio {_spread(shaped)}",
        ),
        Row(
            label,
            "uplink bytes per package (whole job)",
            median(uplink) / 1e3,
            "kB",
            "package",
            median(uplink) / one,
            0.01,
            at_most=True,
            note=f"kB {_spread([u / 1e3 for u in uplink])}; {median(uplink) / one:.4%} of it",
        ),
    ]
    section.seconds = time.perf_counter() - started
    log(f"topology: {section.seconds:.0f} s")
    return section


def _main() -> int:
    if sys.argv[1:] != ["probe"]:
        print("usage: python -m benchmarks.topology probe  (a spec on stdin)", file=sys.stderr)
        return 2
    probe: Probe = json.loads(sys.stdin.read())
    result = _assemble_here(probe) if probe["mode"] == "assemble" else _job_here(probe)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
