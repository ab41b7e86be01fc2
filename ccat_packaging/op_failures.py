"""Every op's failures, judged by ``failure_policy`` and answered in Dagster's terms.

A retryable failure becomes Dagster's step retry after the policy's backoff; a permanent one
becomes a step failure carrying the reason, which fails the run and so leaves the group's
partition of the location's packages asset failed until a later run succeeds. An interrupted step
(the run terminated, its worker stopped) releases its package at once instead of leaving a
lease that only goes stale after ``CCAT_STALE_AFTER_SECONDS``.
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import dagster as dg

from ccat_packaging import failure_policy, influx, run_metadata
from ccat_packaging.plans import PackagePlan
from ccat_packaging.registration import lease_owner, release
from ccat_packaging.resources import OpsDatabase


@contextmanager
def handled(
    context: dg.OpExecutionContext,
    ops_db: OpsDatabase,
    plan: PackagePlan | None,
    discard: Callable[[], object] | None = None,
) -> Iterator[None]:
    """Apply the failure policy to the block; ``plan`` is the package it works on, if any, and
    ``discard`` removes the temporary archive the block holds: called when the package will not
    come back to it (a permanent failure, an interruption), not before a retry of the step,
    which needs it."""
    try:
        yield
    except (dg.Failure, dg.RetryRequested):
        raise
    except Exception as raw:
        verdict = failure_policy.judge(raw, context.retry_number)
        if plan is not None:
            failure_policy.record(
                ops_db.session, plan.package_id, _owner(context), verdict, context.log.error
            )
        if verdict.retry:
            context.log.warning(
                f"attempt {verdict.attempt} failed ({verdict.reason}); "
                f"retrying in {verdict.wait_seconds:.1f} s"
            )
            raise dg.RetryRequested(
                max_retries=failure_policy.MAX_RETRIES, seconds_to_wait=verdict.wait_seconds
            ) from raw
        _discard(context, discard)
        if plan is not None:
            influx.record_failed(plan, verdict, context.log.warning)
        raise dg.Failure(
            description=verdict.reason,
            metadata=run_metadata.failed(plan, verdict),
            allow_retries=False,
        ) from raw
    except BaseException as interruption:  # Dagster's termination, SIGTERM, SIGINT
        _discard(context, discard)
        if plan is not None:
            reason = f"{type(interruption).__name__} in run {context.run_id}"
            with ops_db.session() as session:
                release(session, plan.package_id, _owner(context), reason)
            context.log.warning(f"{plan.name}: interrupted; released for its next run")
        raise


def _owner(context: dg.OpExecutionContext) -> str:
    return lease_owner(context.run_id, context.run.root_run_id)


def _discard(context: dg.OpExecutionContext, discard: Callable[[], object] | None) -> None:
    """Best effort: a temporary archive left behind is removed by the package's next build."""
    if discard is None:
        return
    try:
        discard()
    except Exception as exc:
        context.log.warning(f"could not remove the temporary archive: {exc}")
