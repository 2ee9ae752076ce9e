"""Accepting work: check the request, hold the price, store the photo, insert the job at its
place in the fair queue, commit, then ask the scheduler to send it (never before the commit: a
worker must find the row)."""
from __future__ import annotations

import functools
import hashlib
import logging
import uuid
from dataclasses import dataclass
from typing import Optional

from sqlalchemy import JSON, BigInteger, LargeBinary, TextClause, Uuid, bindparam, text

from config.kinds import KINDS, STYLES, JobKind, get_kind
from renderq import billing, storage, tracing
from renderq.db import db
from renderq.enums import EntryKind, Status
from renderq.errors import InsufficientCredits, InvalidInput
from renderq.images import CheckedImage
from renderq.jobs import idempotency, scheduler
from renderq.logs import job_logging
from renderq.models import Job, Photo

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
    if idempotency_key:
        billing.lock_user(user_id)  # two requests with the same key: the second waits, then finds the first's job
        digest = idempotency.fingerprint(kind=kind.name, params=params, photo=str(photo.id) if photo else None,
                                         image=hashlib.sha256(image.data).hexdigest() if image else None)
        replayed = idempotency.replayed_job(user_id, idempotency_key, digest)
        if replayed is not None:
            job = db.session.get(Job, replayed)
            accepted = Accepted(job, scheduler.queue_position(job))
            _commit_keeping_what_was_read()
            tracing.mark_job(replayed)
            return accepted
    job_id = uuid.uuid4()
    with job_logging(job_id):  # the statements that make the job carry its id in traces too
        values = {"user_id": user_id, "job_id": job_id, "kind": kind.name, "params": params, "price": kind.price,
                  "photo_id": photo.id if photo else None, "trace_parent": tracing.current_traceparent(),
                  "tag_step": scheduler.TAG_STEP, "hold": EntryKind.HOLD}
        bytes_in_statement = image is not None and storage.storage().transactional
        if image is not None:
            values["photo_id"] = uuid.uuid4()
            values.update(photo_path="photos/%s.%s" % (values["photo_id"], image.extension),
                          content_type=image.content_type, width=image.width, height=image.height,
                          size_bytes=len(image.data))
            if bytes_in_statement:
                values["photo_bytes"] = image.data
            else:
                storage.storage().put(values["photo_path"], image.data)
        row = db.session.connection().execute(_accept_statement(image is not None, bytes_in_statement), values).first()
        if row is None:
            db.session.rollback()
            if image is not None and not storage.storage().transactional:
                storage.storage().delete([values["photo_path"]])  # a refusal stores nothing
            raise InsufficientCredits(kind.price, billing.available_credits(user_id))
        if idempotency_key:
            idempotency.remember(user_id, idempotency_key, digest, job_id)
        job = Job(id=job_id, user_id=user_id, photo_id=values["photo_id"], kind=kind.name, params=params,
                  price=kind.price, status=Status.PENDING, attempts=0, retry_count=0, created_at=row.created_at,
                  updated_at=row.created_at)
        accepted = Accepted(job, row.queue_position)
        db.session.commit()
        tracing.mark_job(job_id)
        log.info("📋 [QUEUE] job %s accepted (%s) for user %s", job_id, kind.name, user_id)
        scheduler.dispatch_soon()
    return accepted


def _commit_keeping_what_was_read() -> None:
    """Commit, the job read for a replayed Idempotency-Key kept as it is: the commit would expire
    it, and the answer would read it again."""
    db.session.expunge_all()
    db.session.commit()


@functools.cache
def _accept_statement(with_photo: bool, with_bytes: bool) -> TextClause:
    """A submission in one statement: the user's hold and fair tag (if the credits suffice; else
    no row), the ledger's hold, the photo, the job, and its place in the queue. The user's row
    lock queues concurrent submissions of one user, as the credits check needs. `with_bytes`:
    the photo's bytes too, where the database is the store (the `blobs` row that
    renderq.storage.PostgresStorage reads); another store has them put before.

    It returns only what the database chose (the time, and the place in the queue): the rest of
    the new job's row is what the statement was given, and every column returned cost the web
    process more to describe and read than PostgreSQL to send.

    The status is in the statement's text (see renderq.db.constant): with a parameter there,
    PostgreSQL cannot count the queue position on the fair-queue index, and reads every pending row."""
    photo = """
        photo AS (
            INSERT INTO photos (id, user_id, path, content_type, width, height, size_bytes)
            SELECT :photo_id, id, :photo_path, :content_type, :width, :height, :size_bytes FROM held
        ),""" if with_photo else ""
    if with_bytes:
        photo += """
        stored AS (
            INSERT INTO blobs (key, data) SELECT :photo_path, :photo_bytes FROM held
        ),"""
    return text("""
        WITH held AS (
            UPDATE users
               SET held = held + :price,
                   fair_tag = GREATEST(fair_tag, COALESCE((SELECT fair_tag FROM scheduler_clock WHERE id = 1), 0))
                              + :tag_step / GREATEST(1, COALESCE(max_inflight, 1))
             WHERE id = :user_id AND balance - held >= :price
            RETURNING id, fair_tag
        ),
        hold AS (
            INSERT INTO ledger_entries (user_id, job_id, entry_type, amount) SELECT id, :job_id, :hold, :price FROM held
        ),%(photo)s
        job AS (
            INSERT INTO jobs (id, user_id, photo_id, kind, params, price, status, attempts, retry_count, fair_tag,
                              trace_parent)
            SELECT :job_id, id, :photo_id, :kind, :params, :price, '%(pending)s', 0, 0, fair_tag, :trace_parent
              FROM held
            RETURNING id, fair_tag, created_at
        )
        SELECT job.created_at, (SELECT count(*) FROM jobs waiting
                        WHERE waiting.status = '%(pending)s' AND waiting.dispatch_token IS NULL
                          AND (waiting.fair_tag, waiting.id) < (job.fair_tag, job.id)) AS queue_position
          FROM job
    """ % {"photo": photo, "pending": Status.PENDING}).bindparams(
        bindparam("job_id", type_=Uuid), bindparam("photo_id", type_=Uuid), bindparam("params", type_=JSON),
        bindparam("tag_step", type_=BigInteger), *([bindparam("photo_bytes", type_=LargeBinary)] if with_bytes else []))
