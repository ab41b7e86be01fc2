"""The code location loads from the database and shows what operators expect."""

from __future__ import annotations

import dagster as dg
import pytest

from ccat_packaging.definitions import defs
from ccat_packaging.errors import ConfigurationError, DatabaseUnavailableError
from ccat_packaging.models import LocationType
from ccat_packaging.resources import OpsDatabase


def test_definitions_load_with_one_sensor_per_active_source_location(world) -> None:
    site = world.site()
    world.location(site, "primecam_raw_data", LocationType.SOURCE)
    world.location(site, "chai-raw-data", LocationType.SOURCE)
    world.location(site, "retired", LocationType.SOURCE, active=False)
    world.location(site, "ccat_buffer", LocationType.BUFFER)
    definitions = defs()
    dg.Definitions.validate_loadable(definitions)
    assert sorted(s.name for s in definitions.sensors or []) == [
        "file_group_discovery",
        "package_chai_raw_data_sensor",
        "package_primecam_raw_data_sensor",
    ]
    discovery = definitions.resolve_sensor_def("file_group_discovery")
    assert discovery.default_status == dg.DefaultSensorStatus.RUNNING and not discovery.has_jobs
    # Besides Dagster's implicit job of all assets (which runs a check alone from the UI):
    assert sorted(j.name for j in definitions.resolve_all_job_defs()) == [
        "__ASSET_JOB",
        "package_chai_raw_data",
        "package_primecam_raw_data",
        "packaging_retention",
        "record_backlog",
    ]
    assert sorted(s.name for s in definitions.schedules or []) == [
        "packaging_retention_daily",
        "record_backlog_every_5_minutes",
    ]
    assert sorted(definitions.resolve_all_asset_keys()) == [
        dg.AssetKey(["packaging_backlog", "chai_raw_data"]),
        dg.AssetKey(["packaging_backlog", "primecam_raw_data"]),
        dg.AssetKey(["raw_data_packages", "chai_raw_data"]),
        dg.AssetKey(["raw_data_packages", "primecam_raw_data"]),
    ]
    job = definitions.resolve_job_def("package_primecam_raw_data")
    # The job materializes the location's packages asset and nothing else (no fixity check).
    [packages] = job.graph.nodes
    assert packages.name == "raw_data_packages__primecam_raw_data"
    assert job.asset_layer.executable_asset_keys == {
        dg.AssetKey(["raw_data_packages", "primecam_raw_data"])
    }
    assert not job.asset_layer.asset_graph.asset_check_keys
    graph = packages.definition
    assert isinstance(graph, dg.GraphDefinition)
    assert [n.name for n in graph.nodes_in_topological_order] == [
        "create_package_records",
        "assemble_tar",
        "checksum",
        "register_at_buffer",
        "summarise_group",
    ]
    assert isinstance(job.partitions_def, dg.DynamicPartitionsDefinition)
    assert job.partitions_def.name == "primecam_raw_data_file_groups"
    # Assemblies of one source host share a concurrency pool, whatever launched the run.
    [assemble] = [n for n in graph.nodes if n.name == "assemble_tar"]
    assert assemble.tags["dagster/concurrency_key"] == "assembly_localhost"
    # Each location's asset has the partitioned fixity check, for operators to run.
    assets = definitions.resolve_asset_graph()
    key = dg.AssetKey(["raw_data_packages", "chai_raw_data"])
    assert assets.get(key).group_name == "packaging"
    [check] = [c for c in assets.asset_check_keys if c.asset_key == key]
    assert check.name == "fixity_at_rest"
    assert assets.get(check).partitions_def == assets.get(key).partitions_def


def test_the_resources_have_no_config_for_the_ui_to_show(world) -> None:
    world.location(world.site(), "src", LocationType.SOURCE)
    # They read the environment when used (test_resources.py): no URL, key or path to show.
    resources = defs().resources or {}
    for name in ("ops_db", "assembly_hosts"):
        assert type(resources[name]).model_fields == {}, name
    assert "postgresql" not in repr(resources)


def test_an_unreachable_database_is_a_clear_load_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    monkeypatch.setenv(
        "DAGSTER_HOME", str(tmp_path)
    )  # never loaded before: nothing to fall back on
    monkeypatch.setenv(
        "CCAT_OPS_DB_URL", "postgresql+psycopg2://postgres:s3cret@127.0.0.1:1/nowhere"
    )
    with pytest.raises(ConfigurationError, match="cannot read SOURCE locations") as info:
        defs()
    assert "s3cret" not in str(info.value)


def test_a_database_outage_at_load_keeps_the_sensors_of_the_last_load(
    world, monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    site = world.site()
    world.location(site, "primecam_raw", LocationType.SOURCE)
    world.location(site, "ccat_buffer", LocationType.BUFFER)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    defs()  # the database up: its locations are kept beside the instance
    down = "postgresql+psycopg2://postgres@127.0.0.1:1/nowhere"
    monkeypatch.setenv("CCAT_OPS_DB_URL", down)
    definitions = defs()
    assert [s.name for s in definitions.sensors or []] == [
        "package_primecam_raw_sensor",
        "file_group_discovery",
    ]
    sensor = definitions.resolve_sensor_def("package_primecam_raw_sensor")
    with (
        dg.instance_for_test() as instance,
        dg.build_sensor_context(instance=instance, resources={"ops_db": OpsDatabase()}) as context,
        pytest.raises(DatabaseUnavailableError, match="the next tick tries again"),
    ):
        sensor(context)  # its ticks fail visibly until the database answers again


def test_locations_under_one_sensor_name_unload_only_their_own_sensor(world) -> None:
    site = world.site()
    world.location(site, "prime-cam", LocationType.SOURCE)
    world.location(site, "prime_cam", LocationType.SOURCE)
    world.location(site, "chai_raw", LocationType.SOURCE)
    world.location(site, "ccat_buffer", LocationType.BUFFER)
    definitions = defs()
    dg.Definitions.validate_loadable(definitions)
    assert sorted(s.name for s in definitions.sensors or []) == [
        "file_group_discovery",
        "package_chai_raw_sensor",
        "package_prime_cam_sensor",
    ]
    assert "package_prime_cam" not in {j.name for j in definitions.resolve_all_job_defs()}
    clash = definitions.resolve_sensor_def("package_prime_cam_sensor")
    assert clash.default_status == dg.DefaultSensorStatus.RUNNING
    with (
        dg.instance_for_test() as instance,
        dg.build_sensor_context(instance=instance) as context,
        pytest.raises(ConfigurationError, match="'prime-cam', 'prime_cam' map to the same"),
    ):
        clash(context)
