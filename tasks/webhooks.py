"""The webhook delivery task: renderq.webhooks does the work, Celery the retries."""
from __future__ import annotations

from celery import shared_task

from renderq import webhooks
from tasks.base import AppContextTask


@shared_task(bind=True, base=AppContextTask, name="renderq.notifications.deliver", acks_late=True,
             reject_on_worker_lost=True, max_retries=webhooks.MAX_DELIVERY_ATTEMPTS, ignore_result=True)
def deliver(self: AppContextTask, notification_id: int) -> None:
    try:
        webhooks.deliver(notification_id)
    except webhooks.RedeliverLater as later:
        raise self.retry(countdown=later.delay, exc=later)
