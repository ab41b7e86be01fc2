"""The run launcher of the scaled-out instance: dagster-celery's, with a health check that
notices a worker that died.

``CeleryRunLauncher`` judges a run's health by its task's state in the result backend. A worker
killed mid-run (power, OOM killer, SIGKILL) never writes a final state, so the task stays
``STARTED`` and run monitoring would wait for ``max_runtime_seconds`` (hours) while the dead run
holds its host's pool slot. Here a ``STARTED`` task is also asked about on the broker: if the
worker that took it answers without it among its active tasks (it was restarted), or has
stayed silent through every check for ``worker_silence_seconds`` (counted from the first
unanswered check), the run worker is reported as failed, run monitoring fails the run, and the
run-retry daemon (or the sensor's stale-package resume) takes it from there
(``failure_policy``). The silence must last because a cut uplink silences a worker that is
still building: a shorter cut must not fail its run. After a longer one the first build may
still be running when the retry starts; the retry then finds the package's lock at the buffer
held (``busy``, retryable) and backs off, so nothing is built twice. A broker this process
cannot reach says nothing about the worker: the check then keeps the task's own state.

Workers must use the prefork pool (Celery's default): a worker whose only thread runs the task
cannot answer the question and would be taken for dead.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import dagster as dg
from dagster._core.launcher import CheckRunHealthResult, WorkerStatus  # no public name
from dagster_celery.launcher import CeleryRunLauncher
from dagster_celery.tags import DAGSTER_CELERY_TASK_ID_TAG
from kombu.exceptions import OperationalError

# How long the health check waits for the worker's answer on the broker.
INSPECT_TIMEOUT_SECONDS = 5.0
DEFAULT_WORKER_SILENCE_SECONDS = 120

log = logging.getLogger(__name__)


class SiteRunLauncher(CeleryRunLauncher):
    """Configured like ``CeleryRunLauncher`` (docs/examples/dagster-celery.yaml), plus
    ``worker_silence_seconds``."""

    def __init__(
        self,
        *args: Any,
        worker_silence_seconds: int = DEFAULT_WORKER_SILENCE_SECONDS,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.worker_silence_seconds = worker_silence_seconds
        self._silent_since: dict[str, float] = {}  # run id: when its worker stopped answering

    @classmethod
    def config_type(cls) -> dict[str, Any]:
        inherited: dict[str, Any] = dict(super().config_type())  # type: ignore[arg-type]
        return {
            **inherited,
            "worker_silence_seconds": dg.Field(
                int,
                is_required=False,
                default_value=DEFAULT_WORKER_SILENCE_SECONDS,
                description="How long the worker of a started run may not answer on the "
                "broker before the run is failed.",
            ),
        }

    def check_run_worker_health(self, run: dg.DagsterRun) -> CheckRunHealthResult:
        health = super().check_run_worker_health(run)
        if health.status != WorkerStatus.RUNNING:
            self._silent_since.pop(run.run_id, None)
            return health
        task_id = run.tags[DAGSTER_CELERY_TASK_ID_TAG]
        started = self.celery.AsyncResult(task_id)
        info: Any = started.info
        worker = info.get("hostname") if isinstance(info, dict) else None
        if not worker:
            return health
        try:
            answer = self.celery.control.inspect(
                destination=[worker], timeout=INSPECT_TIMEOUT_SECONDS
            ).active()
        except (OperationalError, OSError) as exc:
            log.warning("cannot ask the broker about worker %s: %s", worker, exc)
            return health
        if answer is not None and any(t.get("id") == task_id for t in answer.get(worker, [])):
            self._silent_since.pop(run.run_id, None)
            return health
        if self.celery.AsyncResult(task_id).state != "STARTED":
            self._silent_since.pop(run.run_id, None)
            return super().check_run_worker_health(run)  # it finished while we asked
        if answer is not None and worker in answer:
            why = "answers, but no longer runs this run's task (it was restarted)"
        else:
            silent = time.monotonic() - self._silent_since.setdefault(run.run_id, time.monotonic())
            if silent < self.worker_silence_seconds:
                return health
            why = f"has not answered on the broker for {silent:.0f} s"
        self._silent_since.pop(run.run_id, None)
        return CheckRunHealthResult(
            WorkerStatus.FAILED, f"Celery worker {worker} {why}: the run's worker is gone."
        )
