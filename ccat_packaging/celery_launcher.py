"""The run launcher of the scaled-out instance: dagster-celery's, with a health check that
notices a worker that died.

``CeleryRunLauncher`` judges a run's health by its task's state in the result backend. A worker
killed mid-run (power, OOM killer, SIGKILL) never writes a final state, so the task stays
``STARTED`` and run monitoring would wait for ``max_runtime_seconds`` (hours) while the dead run
holds its host's pool slot. Here a ``STARTED`` task is also asked about on the broker: if the
worker that took it does not answer, or answers without it among its active tasks, the run
worker is reported as failed, run monitoring fails the run, and the run-retry daemon (or the
sensor's stale-package resume) takes it from there (``failure_policy``).

Workers must use the prefork pool (Celery's default): a worker whose only thread runs the task
cannot answer the question and would be taken for dead.
"""

from __future__ import annotations

from typing import Any

import dagster as dg
from dagster._core.launcher import CheckRunHealthResult, WorkerStatus  # no public name
from dagster_celery.launcher import CeleryRunLauncher
from dagster_celery.tags import DAGSTER_CELERY_TASK_ID_TAG

# How long the health check waits for the worker's answer on the broker.
INSPECT_TIMEOUT_SECONDS = 5.0


class SiteRunLauncher(CeleryRunLauncher):
    """Configured exactly like ``CeleryRunLauncher`` (docs/examples/dagster-celery.yaml)."""

    def check_run_worker_health(self, run: dg.DagsterRun) -> CheckRunHealthResult:
        health = super().check_run_worker_health(run)
        if health.status != WorkerStatus.RUNNING:
            return health
        task_id = run.tags[DAGSTER_CELERY_TASK_ID_TAG]
        started = self.celery.AsyncResult(task_id)
        info: Any = started.info
        worker = info.get("hostname") if isinstance(info, dict) else None
        if not worker:
            return health
        answer = self.celery.control.inspect(
            destination=[worker], timeout=INSPECT_TIMEOUT_SECONDS
        ).active()
        if answer is not None and any(t.get("id") == task_id for t in answer.get(worker, [])):
            return health
        if self.celery.AsyncResult(task_id).state != "STARTED":
            return super().check_run_worker_health(run)  # it finished while we asked
        why = (
            "does not answer on the broker"
            if answer is None or worker not in answer
            else "answers, but no longer runs this run's task (it was restarted)"
        )
        return CheckRunHealthResult(
            WorkerStatus.FAILED, f"Celery worker {worker} {why}: the run's worker is gone."
        )
