"""Run placement without Dagster: site queues, per-location overrides, and the job tag."""

from __future__ import annotations

import pytest

from ccat_packaging.discovery import source_locations
from ccat_packaging.errors import ConfigurationError
from ccat_packaging.jobs import build_package_job
from ccat_packaging.models import LocationType
from ccat_packaging.names import CELERY_QUEUE_TAG
from ccat_packaging.run_placement import QUEUES_ENV, queue_overrides, run_queue, site_queue


def test_a_site_queue_is_named_after_the_site() -> None:
    assert site_queue("telescope") == "ccat_telescope"
    assert site_queue("CCAT Cologne") == "ccat_ccat_cologne"


def test_an_override_moves_one_location(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(QUEUES_ENV, " primecam_raw = primecam-host , chai_raw=ccat.chai ")
    overrides = queue_overrides()
    assert overrides == {"primecam_raw": "primecam-host", "chai_raw": "ccat.chai"}
    assert run_queue("primecam_raw", "telescope", overrides) == "primecam-host"
    assert run_queue("other_raw", "telescope", overrides) == "ccat_telescope"


@pytest.mark.parametrize("value", ["primecam_raw", "=q", "primecam_raw=", "a=b c", "a=b;rm"])
def test_a_malformed_override_is_an_error(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(QUEUES_ENV, value)
    with pytest.raises(ConfigurationError, match=QUEUES_ENV):
        queue_overrides()


def test_an_override_naming_no_source_location_is_an_error(world, monkeypatch) -> None:
    site = world.site("telescope")
    world.location(site, "primecam_raw", LocationType.SOURCE)
    world.location(site, "retired_raw", LocationType.SOURCE, active=False)
    monkeypatch.setenv(QUEUES_ENV, "retired_raw=q1,primecam-raw=q2")  # a typo in the second
    with world.session() as s, pytest.raises(ConfigurationError, match="'primecam-raw'"):
        source_locations(s)


def test_every_run_of_a_location_carries_its_queue(world, monkeypatch) -> None:
    monkeypatch.setenv(QUEUES_ENV, "chai_raw=chai_host")
    site = world.site("telescope")
    world.location(site, "primecam_raw", LocationType.SOURCE)
    world.location(site, "chai_raw", LocationType.SOURCE)
    with world.session() as s:
        locations = {loc.name: loc for loc in source_locations(s)}
    assert locations["primecam_raw"].run_queue == "ccat_telescope"
    assert locations["chai_raw"].run_queue == "chai_host"
    job = build_package_job(locations["primecam_raw"])
    assert job.tags is not None
    assert job.tags[CELERY_QUEUE_TAG] == "ccat_telescope"  # job tags are copied to every run
