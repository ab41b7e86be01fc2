"""``python -m ccat_packaging_tests.run_partition_process DAGSTER_HOME KEY``: one packaging run
in its own process, so tests can kill it or race several against each other."""

from __future__ import annotations

import sys

import dagster as dg

from ccat_packaging_tests.dagster_helpers import run_partition


def main(home: str, key: str) -> int:
    with dg.DagsterInstance.from_config(home) as instance:
        return 0 if run_partition(instance, key).success else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
