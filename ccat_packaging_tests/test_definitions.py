"""The code location loads from the database and shows what operators expect."""

from __future__ import annotations

import dagster as dg
import pytest

from ccat_packaging.definitions import defs
from ccat_packaging.errors import ConfigurationError
from ccat_packaging.models import LocationType


def test_definitions_load_with_one_sensor_per_active_source_location(world) -> None:
    site = world.site()
    world.location(site, "primecam_raw_data", LocationType.SOURCE)
    world.location(site, "chai-raw-data", LocationType.SOURCE)
    world.location(site, "retired", LocationType.SOURCE, active=False)
    world.location(site, "ccat_buffer", LocationType.BUFFER)
    definitions = defs()
    dg.Definitions.validate_loadable(definitions)
    assert sorted(s.name for s in definitions.sensors or []) == [
        "package_chai_raw_data_sensor",
        "package_primecam_raw_data_sensor",
    ]
    assert sorted(j.name for j in definitions.resolve_all_job_defs()) == [
        "package_chai_raw_data",
        "package_primecam_raw_data",
        "packaging_retention",
    ]
    job = definitions.resolve_job_def("package_primecam_raw_data")
    assert [n.name for n in job.graph.nodes_in_topological_order] == [
        "create_package_records",
        "assemble_tar",
        "checksum",
        "register_at_buffer",
    ]
    assert isinstance(job.partitions_def, dg.DynamicPartitionsDefinition)
    assert job.partitions_def.name == "primecam_raw_data_file_groups"
    # Assemblies of one source host share a concurrency pool, whatever launched the run.
    [assemble] = [n for n in job.graph.nodes if n.name == "assemble_tar"]
    assert assemble.tags["dagster/concurrency_key"] == "assembly_localhost"


def test_the_resources_have_no_config_for_the_ui_to_show(world) -> None:
    world.location(world.site(), "src", LocationType.SOURCE)
    # They read the environment when used (test_resources.py): no URL, key or path to show.
    resources = defs().resources or {}
    for name in ("ops_db", "assembly_hosts"):
        assert type(resources[name]).model_fields == {}, name
    assert "postgresql" not in repr(resources)


def test_an_unreachable_database_is_a_clear_load_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "CCAT_OPS_DB_URL", "postgresql+psycopg2://postgres:s3cret@127.0.0.1:1/nowhere"
    )
    with pytest.raises(ConfigurationError, match="cannot read SOURCE locations") as info:
        defs()
    assert "s3cret" not in str(info.value)
