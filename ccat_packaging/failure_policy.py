"""What happens when a step fails, and where the failure is recorded.

Four paths lead to another attempt at a package; this is the one place that describes them all
(docs/operations.md links here):

1. **Op retry** (``judge`` and ``record``, applied to every op by ``jobs``): an error is
   classified as retryable (unreachable host, dropped connection, stalled assembly, database
   down, file still being written, buffer space reserved by packages being written into it,
   ...) or not (``errors``). A retryable one is retried up to ``MAX_RETRIES`` times, waiting
   ``CCAT_RETRY_BASE_SECONDS`` doubled per attempt with ±50 % jitter, and each retry is
   counted in the package's ``retry_count``. After the last retry, and
   at once for any other error, the package is ``failed`` with the error class and message
   (``registration.mark_failed``), unless another attempt completed it meanwhile.
2. **Run retry** (``run_retries`` in dagster.yaml, and the job tag ``dagster/retry_strategy:
   ALL_STEPS`` set in ``jobs.build_package_job``): a run whose worker crashed is started again
   from its first step. Every op is safe to run again, and the retried run inherits the leases
   of the run it retries (``registration.lease_owner``).
3. **Stale resume** (``discovery.packages_needing_a_run``, requested by ``sensors``): an
   unfinished package whose heartbeat stopped (killed worker, reboot) gets a run of its group,
   which takes it over and builds it.
4. **Operator re-drive** (``launched_by_operator``; ``registration.reset_failed``, also behind
   ``ccat-packaging requeue``): failed packages are left alone by sensor runs, and taken back
   with a fresh retry budget by a run an operator launched.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass

from sqlalchemy.orm import Session

from ccat_packaging import settings
from ccat_packaging.db import unavailable
from ccat_packaging.errors import PackagingError
from ccat_packaging.names import PARENT_RUN_ID_TAG, RETRY_NUMBER_TAG, SENSOR_NAME_TAG
from ccat_packaging.registration import mark_failed, record_retry

MAX_RETRIES = 3


def classify(exc: Exception) -> PackagingError:
    """The packaging error an exception stands for; anything unforeseen is not retryable."""
    if isinstance(exc, PackagingError):
        return exc
    return unavailable(exc) or PackagingError(f"unexpected {type(exc).__name__}: {exc}")


def backoff_seconds(retry_number: int) -> float:
    """The wait before retry ``retry_number + 1``; the jitter keeps runs that failed together
    (a host that went down) from all coming back at the same moment."""
    base = settings.retry_base_seconds() * 2**retry_number
    return base * random.uniform(0.5, 1.5)


@dataclass(frozen=True)
class Verdict:
    """What to do about one failed attempt (``attempt`` counts from 1)."""

    error: PackagingError
    attempt: int
    retry: bool
    wait_seconds: float
    reason: str


def judge(exc: Exception, retry_number: int) -> Verdict:
    """Retry, or give up: ``retry_number`` is how many retries of this step came before."""
    error = classify(exc)
    reason = f"{type(error).__name__}: {error}"
    attempt = retry_number + 1
    if error.retryable and retry_number < MAX_RETRIES:
        return Verdict(error, attempt, True, backoff_seconds(retry_number), reason)
    if error.retryable:
        reason = f"gave up after {attempt} attempts: {reason}"
    return Verdict(error, attempt, False, 0.0, reason)


def record(
    session: Callable[[], AbstractContextManager[Session]],
    package_id: int,
    owner: str,
    verdict: Verdict,
    log_error: Callable[[str], object],
) -> None:
    """Count the retry, or mark the package failed with its reason.

    Best effort: when the database itself is down, the error is logged and the package's
    heartbeat stops, so the stale resume (path 3 above) finds it.
    """
    try:
        with session() as s:
            if verdict.retry:
                record_retry(s, package_id, owner, verdict.reason)
            else:
                mark_failed(s, package_id, owner, verdict.reason)
    except Exception as exc:
        log_error(f"could not record the failure in the database: {classify(exc)}")


def launched_by_operator(tags: Mapping[str, str]) -> bool:
    """Whether a run re-drives its group's failed packages.

    A run a sensor launched, and Dagster's automatic retry of one, leaves them alone: a package
    that fails for good must not be rebuilt on every late file of its group. A backfill, a
    launch from the launchpad and a re-execution are an operator's decision to try again.
    """
    if SENSOR_NAME_TAG not in tags:
        return True
    return PARENT_RUN_ID_TAG in tags and RETRY_NUMBER_TAG not in tags
