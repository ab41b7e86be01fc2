"""Run the benchmarks, print the table, and write it into docs/performance.md.

``python -m benchmarks`` (``make bench``) runs all of them at the sizes the report is about, in
10 to 14 minutes on the 2-core reference machine; ``--only`` picks some, ``--quick`` shrinks every
size for a smoke test (its numbers say nothing and are not written to the report unless
``--write`` is given). Run as root from the repository root: it drops the page cache and starts
private sshd processes. Everything it creates (scratch directories under /var/tmp, scratch
PostgreSQL databases, network namespaces, sshd, RabbitMQ and Dagster processes) is removed when
it ends, failed or not.
"""

from __future__ import annotations

import argparse
import re
import signal
import sys
import time
from datetime import UTC, datetime

from benchmarks import assembly, discovery, orchestration, topology
from benchmarks.common import (
    REPO,
    Section,
    log,
    machine,
    markdown_table,
    require_root,
    scratch_dir,
    text_table,
)

REPORT = REPO / "docs" / "performance.md"
BEGIN = "<!-- BEGIN make bench: generated, replaced on every run -->"
END = "<!-- END make bench -->"
BEGIN_DETAILS = "<!-- BEGIN make bench details: generated, replaced on every run -->"
END_DETAILS = "<!-- END make bench details -->"
ALL = ("assembly", "memory", "discovery", "orchestration", "topology")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--only", default=",".join(ALL), help=f"comma-separated of {ALL}")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    parser.add_argument("--rounds", type=int, help="assembly rounds (default 2, quick 1)")
    parser.add_argument("--groups", type=int, help="orchestration groups (default 48, quick 12)")
    parser.add_argument(
        "--write",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="write docs/performance.md (default: yes, unless --quick or --only)",
    )
    args = parser.parse_args(argv)
    only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = set(only) - set(ALL)
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    write = args.write if args.write is not None else not args.quick and set(only) == set(ALL)
    require_root()
    # A plain SIGTERM would skip the clean-up below; as an exception it runs every `finally`.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    started = time.perf_counter()
    sections: list[Section] = []
    with scratch_dir("run") as scratch:
        if "assembly" in only or "memory" in only:
            sizes = assembly.Sizes()
            if args.quick:
                sizes = assembly.Sizes(2, 16 << 20, 500, 10, 4, 1)
            if args.rounds:
                sizes.rounds = args.rounds
            found = assembly.run(
                scratch / "assembly", sizes, throughput="assembly" in only, memory="memory" in only
            )
            sections += found
        if "discovery" in only:
            sections.append(discovery.run(discovery.Sizes.quick() if args.quick else None))
        if "topology" in only:
            quick = topology.Sizes(2, 16 << 20, 1) if args.quick else None
            sections.append(topology.run(scratch / "topology", quick))
        if "orchestration" in only:
            sections.append(
                orchestration.run(
                    scratch / "orchestration", groups=args.groups or (12 if args.quick else None)
                )
            )
    total = time.perf_counter() - started

    rows = [row for section in sections for row in section.rows]
    print()
    print(text_table(rows))
    print()
    for section in sections:
        print(f"{section.title}: {section.seconds:.0f} s")
    print(f"total: {total:.0f} s")
    missed = [row for row in rows if row.met is False]
    if missed:
        print(f"{len(missed)} target(s) not met in this run")
    if write:
        _write_report(sections, total)
        print(f"written to {REPORT.relative_to(REPO)}")
    return 0


def _generated(sections: list[Section], total: float) -> tuple[str, str]:
    """The table with the machine and notes, and the details (query plans)."""
    lines = [
        BEGIN,
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC by `make bench` in {total:.0f} s.",
        "",
        "| machine | |",
        "|---|---|",
    ]
    lines += [f"| {key} | {value} |" for key, value in machine()]
    lines += ["", markdown_table([row for s in sections for row in s.rows]), ""]
    notes = [row for s in sections for row in s.rows if row.note]
    if notes:
        lines += ["Notes on rows:", ""]
        lines += [f"- {row.benchmark} / {row.measure}: {row.note}" for row in notes]
        lines.append("")
    lines += [f"Time taken: {', '.join(f'{s.title} {s.seconds:.0f} s' for s in sections)}."]
    lines.append(END)
    details = [BEGIN_DETAILS] + [d for s in sections for d in s.details] + [END_DETAILS]
    return "\n".join(lines), "\n\n".join(details)


def _replace(text: str, begin: str, end: str, block: str) -> str:
    if begin not in text or end not in text:
        return text.rstrip("\n") + f"\n\n{block}\n"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    return pattern.sub(lambda _: block, text, count=1)


def _write_report(sections: list[Section], total: float) -> None:
    table, details = _generated(sections, total)
    text = REPORT.read_text() if REPORT.exists() else "# Performance\n"
    text = _replace(text, BEGIN, END, table)
    text = _replace(text, BEGIN_DETAILS, END_DETAILS, details)
    REPORT.parent.mkdir(exist_ok=True)
    REPORT.write_text(text)
    log(f"wrote {REPORT}")


if __name__ == "__main__":
    sys.exit(main())
