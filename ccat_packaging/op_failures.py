"""Every op's failures, judged by ``failure_policy`` and answered in Dagster's terms.

A retryable failure becomes Dagster's step retry after the policy's backoff; a permanent one
becomes a step failure carrying the reason, and an observation in the package's history
(asset ``raw_data_packages``), so the UI shows it next to the completions.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg

from ccat_packaging import failure_policy, names, run_metadata
from ccat_packaging.plans import PackagePlan
from ccat_packaging.registration import lease_owner
from ccat_packaging.resources import OpsDatabase


@contextmanager
def handled(
    context: dg.OpExecutionContext, ops_db: OpsDatabase, plan: PackagePlan | None
) -> Iterator[None]:
    """Apply the failure policy to the block; ``plan`` is the package it works on, if any."""
    try:
        yield
    except (dg.Failure, dg.RetryRequested):
        raise
    except Exception as raw:
        verdict = failure_policy.judge(raw, context.retry_number)
        if plan is not None:
            owner = lease_owner(context.run_id, context.run.root_run_id)
            failure_policy.record(
                ops_db.session, plan.package_id, owner, verdict, context.log.error
            )
        if verdict.retry:
            context.log.warning(
                f"attempt {verdict.attempt} failed ({verdict.reason}); "
                f"retrying in {verdict.wait_seconds:.1f} s"
            )
            raise dg.RetryRequested(
                max_retries=failure_policy.MAX_RETRIES, seconds_to_wait=verdict.wait_seconds
            ) from raw
        metadata = run_metadata.failed(plan, verdict)
        if plan is not None:
            context.log_event(
                dg.AssetObservation(
                    asset_key=names.PACKAGES_ASSET,
                    partition=context.partition_key,
                    metadata=metadata,
                )
            )
        raise dg.Failure(
            description=verdict.reason, metadata=metadata, allow_retries=False
        ) from raw
