"""Each location's sensor: one request per unpackaged group, nothing for packaged files, and a
tick that cannot work says why."""

from __future__ import annotations

import dagster as dg
import pytest

from ccat_packaging.definitions import defs
from ccat_packaging.errors import DatabaseUnavailableError, NoActiveBufferError
from ccat_packaging.models import LocationType
from ccat_packaging.names import BUFFER_LOCATION_TAG
from ccat_packaging.resources import OpsDatabase
from ccat_packaging.sensors import CHECK_ONE_BY_ONE, unregistered
from ccat_packaging_tests.dagster_helpers import evaluate_sensor, run_partition


def _site_with_groups(world, n_groups: int = 3):
    site = world.site()
    src = world.location(site, "src", LocationType.SOURCE)
    other = world.location(site, "other", LocationType.SOURCE)
    world.location(site, "buf", LocationType.BUFFER)
    groups = [world.group(src) for _ in range(n_groups)]
    for g in groups:
        for i in range(2):
            world.file(g, f"eou{g.eou_id}/f{i}.dat")
    world.file(world.group(other), "elsewhere.dat")  # another location's sensor handles it
    return groups


def test_one_request_per_group_with_partition_keys_and_partitions(world) -> None:
    groups = _site_with_groups(world)
    with dg.instance_for_test() as instance:
        result = evaluate_sensor("package_src_sensor", instance)
    keys = [f"src__eou{g.eou_id}__mod{g.module_id}" for g in groups]
    assert [r.partition_key for r in result.run_requests or []] == keys
    assert len({r.run_key for r in result.run_requests or []}) == len(keys)
    assert result.dynamic_partitions_requests is not None
    added = result.dynamic_partitions_requests[0]
    assert isinstance(added, dg.AddDynamicPartitionsRequest)
    assert list(added.partition_keys) == keys
    assert {r.tags["ccat/files"] for r in result.run_requests or []} == {"2"}
    # The buffer is chosen when the package is assembled: the run names the one it went to.
    assert all(BUFFER_LOCATION_TAG not in r.tags for r in result.run_requests or [])
    with dg.instance_for_test() as instance:
        request = (result.run_requests or [])[0]
        run = run_partition(instance, str(request.partition_key), tags=dict(request.tags))
        assert run.success
        record = instance.get_run_by_id(run.run_id)
        assert record is not None and {record.tags[BUFFER_LOCATION_TAG]} == {"buf"}


def test_nothing_is_requested_for_packaged_files_and_late_files_get_a_new_run_key(world) -> None:
    groups = _site_with_groups(world, n_groups=2)
    with dg.instance_for_test() as instance:
        first = evaluate_sensor("package_src_sensor", instance)
        for request in first.run_requests or []:
            assert run_partition(instance, str(request.partition_key)).success
        after = evaluate_sensor("package_src_sensor", instance)
        assert not after.run_requests
        assert "no new unpackaged files" in str(after.skip_reason)
        # Even a full rescan (fresh cursor) finds nothing: the files are claimed.
        assert not evaluate_sensor("package_src_sensor", instance).run_requests
        world.file(groups[0], "late.dat")
        late = evaluate_sensor("package_src_sensor", instance, cursor=after.cursor)
    assert [r.partition_key for r in late.run_requests or []] == [
        f"src__eou{groups[0].eou_id}__mod{groups[0].module_id}"
    ]
    first_keys = {r.run_key for r in first.run_requests or []}
    assert (late.run_requests or [])[0].run_key not in first_keys


def test_a_site_without_an_active_buffer_fails_the_tick_visibly(world) -> None:
    site = world.site()
    src = world.location(site, "src", LocationType.SOURCE)
    world.location(site, "buf", LocationType.BUFFER, active=False)
    world.file(world.group(src), "a.dat")
    with (
        dg.instance_for_test() as instance,
        pytest.raises(NoActiveBufferError, match="no active BUFFER"),
    ):
        evaluate_sensor("package_src_sensor", instance)


def test_an_unreachable_database_fails_the_tick_with_one_clear_line(
    world, monkeypatch: pytest.MonkeyPatch
) -> None:
    world.location(world.site(), "src", LocationType.SOURCE)
    sensor = defs().resolve_sensor_def("package_src_sensor")  # loaded while the database is up
    down = "postgresql+psycopg2://postgres:s3cret@127.0.0.1:1/nowhere"
    monkeypatch.setenv("CCAT_OPS_DB_URL", down)
    with (
        dg.instance_for_test() as instance,
        dg.build_sensor_context(instance=instance, resources={"ops_db": OpsDatabase()}) as context,
        pytest.raises(DatabaseUnavailableError) as info,
    ):
        sensor(context)
    message = str(info.value)
    assert message.startswith("operations database unavailable: connection to server at")
    assert message.endswith("; the next tick tries again")
    assert "\n" not in message and "s3cret" not in message
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no driver trace


def test_a_tick_that_requests_runs_creates_its_host_pool_first(world) -> None:
    _site_with_groups(world, n_groups=1)
    pools = {"concurrency": {"pools": {"default_limit": 2}}}
    with dg.instance_for_test(overrides=pools) as instance:
        assert instance.event_log_storage.get_pool_limits() == []
        evaluate_sensor("package_src_sensor", instance)
        [pool] = instance.event_log_storage.get_pool_limits()
    # Made before any run claims a slot: concurrent first claims would race in Dagster.
    assert (pool.name, pool.limit, pool.from_default) == ("assembly_localhost", 2, True)


def test_discovery_registers_each_new_group_once_and_launches_nothing(world) -> None:
    groups = _site_with_groups(world, n_groups=2)
    keys = [f"src__eou{g.eou_id}__mod{g.module_id}" for g in groups]
    pools = {"concurrency": {"pools": {"default_limit": 1}}}
    with dg.instance_for_test(overrides=pools) as instance:
        instance.add_dynamic_partitions("src_file_groups", keys[:1])  # a sensor registered it
        first = evaluate_sensor("file_group_discovery", instance)
        assert not first.run_requests
        added = {
            r.partitions_def_name: list(r.partition_keys)
            for r in first.dynamic_partitions_requests or []
        }
        assert added["src_file_groups"] == keys[1:]  # only what is not registered yet
        assert len(added["other_file_groups"]) == 1
        assert first.skip_reason is not None
        assert first.skip_reason.skip_message == "new partitions registered: 'src' 1, 'other' 1"
        # A backfill of them from the UI starts its runs at once: their pool exists first.
        assert [p.name for p in instance.event_log_storage.get_pool_limits()] == [
            "assembly_localhost"
        ]
        world.file(groups[0], "late.dat")
        again = evaluate_sensor("file_group_discovery", instance, cursor=first.cursor)
    # The late file's group is past the cursor, and registered already: nothing to send.
    assert not again.dynamic_partitions_requests
    assert again.skip_reason is not None
    assert again.skip_reason.skip_message == "new partitions registered: 'src' 0, 'other' 0"


@pytest.mark.parametrize("candidates", [5, CHECK_ONE_BY_ONE + 10], ids=["few", "many"])
def test_unregistered_keys_are_found_by_point_checks_or_one_read(candidates: int) -> None:
    keys = [f"src__eou{i}__mod1" for i in range(candidates)]
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("src_file_groups", keys[::2])
        assert unregistered(instance, "src_file_groups", keys) == keys[1::2]
