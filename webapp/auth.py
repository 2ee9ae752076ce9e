"""Bearer-token authentication; tokens are stored as SHA-256 digests, never in clear."""
from __future__ import annotations

import functools
import hashlib
import secrets
from typing import Any, Callable, TypeVar

from flask import g, request
from sqlalchemy import bindparam, select

from renderq.db import db
from renderq.errors import Forbidden
from renderq.models import User
from webapp.errors import ApiError

F = TypeVar("F", bound=Callable)


def new_token() -> tuple[str, str]:
    """A fresh token and the digest to store."""
    # The prefix marks a leaked token as ours to secret scanners, and keeps its first
    # character from being "-", which a command line would take for an option.
    token = "rq_" + secrets.token_urlsafe(32)
    return token, token_digest(token)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


# Every request reads its user, so as a row of columns, by a statement built once: loading a
# User object took the web more time than PostgreSQL took to answer. A view that changes the
# user loads the object (webapp.api_me).
_BY_TOKEN_HASH = select(*User.__table__.columns).where(User.token_hash == bindparam("token_hash"))


def _authenticate(autocommit: bool = False) -> Any:
    """The caller's user row, read as the request's first statement. `autocommit`: the request's
    connection is taken in autocommit, for a request whose statements each stand alone."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "UNAUTHORIZED", "Send 'Authorization: Bearer <token>'; create a token with "
                                            "'flask --app webapp users create'.")
    connection = db.session.connection(execution_options=_AUTOCOMMIT if autocommit else None)
    user = connection.execute(_BY_TOKEN_HASH, {"token_hash": token_digest(token.strip())}).first()
    if user is None:
        raise ApiError(401, "UNAUTHORIZED", "The bearer token is not valid.")
    return user


def _signed_in(view: F, authenticate: Callable[[], Any]) -> F:
    @functools.wraps(view)
    def wrapper(*args: object, **kwargs: object) -> object:
        g.user = authenticate()
        return view(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def login_required(view: F) -> F:
    return _signed_in(view, _authenticate)


_AUTOCOMMIT = {"isolation_level": "AUTOCOMMIT"}


def submission_login_required(view: F) -> F:
    """login_required for the two submissions. Without an Idempotency-Key, what a submission
    writes is one statement (renderq.jobs.submit), atomic by itself, and what it reads stands
    alone too: its connection is taken in autocommit, and the token's lookup and the submission
    are the request's two round trips, where a transaction made four (BEGIN before, COMMIT
    after). With a key, the replay check and the new job share a transaction."""
    return _signed_in(view, lambda: _authenticate(autocommit="Idempotency-Key" not in request.headers))


def admin_required(view: F) -> F:
    return _signed_in(view, _administrator)


def _administrator() -> Any:
    user = _authenticate()
    if not user.is_admin:
        raise Forbidden("FORBIDDEN", "This endpoint is for administrators.")
    return user


def ensure_owner_or_admin(owner_id: int) -> None:
    if g.user.id != owner_id and not g.user.is_admin:
        raise Forbidden("FORBIDDEN", "This belongs to another user.")
