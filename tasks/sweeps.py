"""Beat's periodic tasks: the background processor, the reconciler and the TTL cleanup."""
from __future__ import annotations

from celery import shared_task

from renderq.jobs import maintenance
from tasks.base import AppContextTask


@shared_task(base=AppContextTask, name="renderq.background.process", ignore_result=True)
def process_background() -> int:
    return maintenance.process_background()


@shared_task(base=AppContextTask, name="renderq.queue.reconcile", ignore_result=True)
def reconcile() -> None:
    maintenance.reconcile()


@shared_task(base=AppContextTask, name="renderq.maintenance.cleanup", ignore_result=True)
def cleanup() -> int:
    return maintenance.cleanup()
