"""``ccat-packaging``: the command line for the embedded demo and operators."""

from __future__ import annotations

import argparse
from pathlib import Path

from ccat_packaging import settings
from ccat_packaging.db import make_engine, redacted
from ccat_packaging.models import Base


def _init_db(_: argparse.Namespace) -> int:
    """Create missing tables (embedded or scratch databases; production has its own schema)."""
    url = settings.ops_db_url()
    engine = make_engine(url)
    Base.metadata.create_all(engine)
    engine.dispose()
    print(f"tables ready in {redacted(url)}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from ccat_packaging import demo

    return demo.run(Path(args.root), reset=args.reset, size_scale=args.size_scale)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ccat-packaging")
    commands = parser.add_subparsers(dest="command", required=True)
    demo_cmd = commands.add_parser("demo", help="package demo files end to end (SQLite, local)")
    demo_cmd.add_argument("--root", default=".ccat/demo", help="where the demo keeps its data")
    demo_cmd.add_argument("--reset", action="store_true", help="start from an empty demo")
    demo_cmd.add_argument(
        "--size-scale", type=float, default=1.0, help="multiply every demo file size by this"
    )
    demo_cmd.set_defaults(handler=_demo)
    init_cmd = commands.add_parser("init-db", help="create the tables in CCAT_OPS_DB_URL")
    init_cmd.set_defaults(handler=_init_db)
    args = parser.parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    raise SystemExit(main())
