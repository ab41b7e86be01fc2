"""The Celery app of a site's run workers (``scripts/run-dagster.sh worker``): dagster-celery's
run tasks, bound to the broker and result backend the launcher uses.

dagster-celery's own worker app reads its broker from a ``dagster_celery_config`` module on the
path; this one takes the same two URLs as the instance's launcher config, from the environment,
so a password lives in one variable on each machine and never in a file. Celery configures
its app when the worker imports this module, so the two are read then.
"""

from __future__ import annotations

import os
import sys

from dagster_celery.config import DEFAULT_CONFIG
from dagster_celery.make_app import make_app
from dagster_celery.tasks import create_execute_job_task, create_resume_job_task

BROKER_ENV = "CCAT_CELERY_BROKER_URL"
BACKEND_ENV = "CCAT_CELERY_BACKEND_URL"

_missing = [name for name in (BROKER_ENV, BACKEND_ENV) if not os.environ.get(name)]
if _missing:  # Celery would quietly fall back to a guest broker on localhost
    sys.exit(f"set {' and '.join(_missing)} (docs/operations.md, 'Where runs execute')")

app = make_app(
    app_args={
        "broker": os.environ[BROKER_ENV],
        "backend": os.environ[BACKEND_ENV],
        "include": [],
        "config_source": {
            **DEFAULT_CONFIG,
            # A lost broker connection is retried while the worker lives, not given up.
            "broker_connection_retry_on_startup": True,
            "broker_connection_max_retries": None,
        },
    }
)
execute_job = create_execute_job_task(app)
resume_job = create_resume_job_task(app)
