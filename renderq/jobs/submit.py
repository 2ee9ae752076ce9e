"""Accepting work: check the request, hold the price, store the photo, insert the job at its
place in the fair queue, commit, then ask the scheduler to send it (never before the commit: a
worker must find the row)."""
from __future__ import annotations

import hashlib
import logging
import uuid
from dataclasses import dataclass
from typing import Optional

from config.kinds import KINDS, STYLES, JobKind, get_kind
from renderq import billing, storage, tracing
from renderq.db import db
from renderq.errors import InvalidInput
from renderq.images import CheckedImage
from renderq.jobs import idempotency, scheduler
from renderq.logs import job_logging
from renderq.models import Job, Photo, User

log = logging.getLogger(__name__)

MAX_PROMPT_CHARS = 2000


def resolve_kind(name: object, default: str) -> JobKind:
    if name is not None and not isinstance(name, str):
        raise InvalidInput("INVALID_KIND", "kind must be a string, one of: %s." % ", ".join(sorted(KINDS)))
    try:
        return get_kind(name or default)
    except KeyError as error:
        raise InvalidInput("INVALID_KIND", str(error.args[0])) from None


def check_params(style: Optional[str], prompt: Optional[str]) -> dict:
    style = style or "sketch"
    if style not in STYLES:
        raise InvalidInput("INVALID_STYLE", "Unknown style %r; valid styles: %s." % (style, ", ".join(STYLES)))
    prompt = prompt or ""
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InvalidInput("INVALID_PROMPT", "The prompt is longer than %d characters." % MAX_PROMPT_CHARS)
    return {"style": style, "prompt": prompt}


def check_idempotency_key(key: Optional[str]) -> Optional[str]:
    if key is None:
        return None
    key = key.strip()
    if not key or len(key) > idempotency.MAX_KEY_LENGTH:
        raise InvalidInput("INVALID_IDEMPOTENCY_KEY",
                           "Idempotency-Key must be 1 to %d characters." % idempotency.MAX_KEY_LENGTH)
    return key


def _store_photo(user: User, image: CheckedImage) -> Photo:
    photo_id = uuid.uuid4()
    key = "photos/%s.%s" % (photo_id, image.extension)
    storage.storage().put(key, image.data)  # with the default storage, in this transaction
    photo = Photo(id=photo_id, user_id=user.id, path=key, content_type=image.content_type,
                  width=image.width, height=image.height, size_bytes=len(image.data))
    db.session.add(photo)
    db.session.flush()  # the job row refers to it
    return photo


@dataclass(frozen=True)
class Accepted:
    job: Job
    queue_position: Optional[int]  # read in the submission's own transaction: the answer needs no other


def submit(user_id: int, kind: JobKind, params: dict, *,
           image: Optional[CheckedImage] = None, photo: Optional[Photo] = None,
           idempotency_key: Optional[str] = None) -> Accepted:
    """Hold the price, store the photo, insert the job and commit; publish only after the
    commit. A refusal (InsufficientCredits) stores nothing; a replayed Idempotency-Key returns
    the job the first request made."""
    if kind.needs_photo and image is None and photo is None:
        raise InvalidInput("PHOTO_REQUIRED", "Kind %r needs a photo: upload one in the 'file' field." % kind.name)
    user = billing.lock_user(user_id)
    if idempotency_key:
        digest = idempotency.fingerprint(kind=kind.name, params=params, photo=str(photo.id) if photo else None,
                                         image=hashlib.sha256(image.data).hexdigest() if image else None)
        replayed = idempotency.replayed_job(user.id, idempotency_key, digest)
        if replayed is not None:
            accepted = _answer(db.session.get(Job, replayed), user)
            tracing.mark_job(replayed)
            return accepted
    job_id = uuid.uuid4()
    with job_logging(job_id):  # the statements that make the job carry its id in traces too
        # The tag first: the user's row then changes once (its tag and its held credits), in the
        # flush that writes the hold.
        fair_tag = scheduler.next_tag(user)
        billing.hold(user, job_id, kind.price)
        if image is not None:
            photo = _store_photo(user, image)
        job = Job(id=job_id, user_id=user.id, photo_id=photo.id if photo else None, kind=kind.name, params=params,
                  price=kind.price, fair_tag=fair_tag, trace_parent=tracing.current_traceparent())
        db.session.add(job)
        db.session.flush()  # the INSERT returns the row's defaults: the answer needs no second read
        if idempotency_key:
            idempotency.remember(user.id, idempotency_key, digest, job_id)
        accepted = _answer(job, user)
        tracing.mark_job(job_id)
        log.info("📋 [QUEUE] job %s accepted (%s) for user %s", job_id, kind.name, user_id)
        scheduler.dispatch_soon()
    return accepted


def _answer(job: Job, user: User) -> Accepted:
    """Read the job's place before the commit and keep the rows as written (the commit would
    expire them), so answering needs no second transaction."""
    accepted = Accepted(job, scheduler.queue_position(job))
    for answered in (job, user):
        db.session.expunge(answered)
    db.session.commit()
    return accepted

