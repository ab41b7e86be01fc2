"""Throughput of one large package assembled locally, over SSH in place, and streamed over SSH.

Run as root from the repository root (it starts two private sshd processes on 127.0.0.2 and
127.0.0.3, like the tests): ``python benchmarks/assembly_ssh_vs_local.py [--gib 1]``. The page
cache is dropped before each build so every one reads the sources cold. Prints MB/s (payload
bytes) per way and its ratio to the local build; no assertions, the numbers are for reading.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ccat_packaging.assembly import archive
from ccat_packaging.claiming import Endpoint, PackagePlan
from ccat_packaging.resources import AssemblyHosts
from ccat_packaging_tests.sshd import keygen, running_sshd

FILE_SIZE = 256 << 20


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gib", type=float, default=1.0, help="package size in GiB")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="assembly-bench-", dir="/var/tmp") as scratch:
        root = Path(scratch)
        source = root / "source"
        source.mkdir()
        members = []
        for i in range(max(1, int(args.gib * (1 << 30)) // FILE_SIZE)):
            name = f"scan_{i:02d}/frame.fits"
            (source / name).parent.mkdir()
            with open(source / name, "wb") as handle:
                for _ in range(FILE_SIZE // (16 << 20)):
                    handle.write(os.urandom(16 << 20))
            members.append((name, FILE_SIZE))
        payload = sum(size for _, size in members)
        public = keygen(root / "client")
        with (
            running_sshd("127.0.0.2", root / "host_a", [public]) as a,
            running_sshd("127.0.0.3", root / "host_b", [public]) as b,
        ):
            (root / "known_hosts").write_text(f"{a.known_hosts_line}\n{b.known_hosts_line}\n")
            hosts = AssemblyHosts(
                key_filename=str(root / "client"), known_hosts=str(root / "known_hosts")
            )

            def here(path: Path) -> Endpoint:
                return Endpoint(1, "local", "localhost", None, 22, str(path))

            ways = {
                "local, in place": (here(source), here(root / "buf_local")),
                "ssh, in place on the source host": (
                    a.endpoint(source, "a"),
                    a.endpoint(root / "buf_a", "a"),
                ),
                "ssh source -> worker -> ssh buffer host": (
                    a.endpoint(source, "a"),
                    b.endpoint(root / "buf_b", "b"),
                ),
                "ssh source -> this machine's buffer": (
                    a.endpoint(source, "a"),
                    here(root / "buf_here"),
                ),
            }
            results: dict[str, float] = {}
            checksums = set()
            for label, (src, buf) in ways.items():
                Path(buf.root).mkdir()
                plan = PackagePlan(1, "bench", "g", 1, "bench.tar", src, buf, tuple(members))
                drop_caches()
                started = time.monotonic()
                built = archive.assemble(hosts, plan)
                seconds = time.monotonic() - started
                checksums.add(built.checksum)
                archive.discard(hosts, built)
                results[label] = payload / seconds / 1e6
            hosts.close()
    local = results["local, in place"]
    print(f"package: {len(members)} files, {payload / 1e9:.2f} GB, cold cache, fsync included")
    for label, rate in results.items():
        print(f"{label:42s} {rate:7.0f} MB/s   ratio to local {rate / local:.2f}")
    print("same checksum every way:", len(checksums) == 1)


if __name__ == "__main__":
    main()
