"""The hostname a Celery worker of the local stack records on the task instances it runs.

Airflow records ``[core] hostname_callable()`` on each task instance; every worker of the local stack
runs on the same machine, so the machine's name would not tell them apart. Each worker's environment
names it instead (``PIPELINE_CELERY_WORKER_HOSTNAME``, its Celery hostname; ``opsctl/services.py``).
"""

from __future__ import annotations

import os
import socket


def worker_hostname() -> str:
    """The worker's Celery hostname from its environment; the machine's name where none is set."""
    return os.environ.get("PIPELINE_CELERY_WORKER_HOSTNAME") or socket.getfqdn()
