"""The webhook delivery task: renderq.webhooks does the work, Celery the retries."""
from __future__ import annotations

from celery import shared_task

from renderq import webhooks
from tasks.base import AppContextTask


# No max_retries: the notification row counts the attempts and gives up after the last one,
# and that count survives a message the reconciler publishes anew, which Celery's does not.
@shared_task(bind=True, base=AppContextTask, name="renderq.notifications.deliver", acks_late=True,
             reject_on_worker_lost=True, max_retries=None, ignore_result=True)
def deliver(self: AppContextTask, notification_id: int) -> None:
    try:
        webhooks.deliver(notification_id)
    except webhooks.RedeliverLater as later:
        raise self.retry(countdown=later.delay, exc=later)
