"""The caller's own account: profile and balance, settings, notifications, safety consent."""
from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, g, jsonify, request
from sqlalchemy import func

from renderq import notify
from renderq.db import db
from renderq.errors import InvalidInput
from renderq.models import User
from renderq.runtime import settings
from renderq.webhook_http import UnsafeUrl, check_url
from webapp.auth import login_required
from webapp.paging import whole_number
from webapp.resources import iso

blueprint = Blueprint("me", __name__)


def profile(user: Any) -> dict:
    return {
        "id": user.id,
        "email": user.email,
        "is_admin": user.is_admin,
        "balance": user.balance,
        "available": user.balance - user.held,
        "locale": user.locale or settings().default_locale,
        "webhook_url": user.webhook_url,
        "safety_agreed_at": iso(user.safety_agreed_at),
        "created_at": iso(user.created_at),
    }


@blueprint.get("/api/me")
@login_required
def get_me() -> Response:
    return jsonify(profile(g.user))


@blueprint.patch("/api/me")
@login_required
def update_me() -> Response:
    changes = request.get_json(silent=True)
    if not isinstance(changes, dict) or not changes:
        raise InvalidInput("INVALID_BODY", "Send a JSON object with 'webhook_url' and/or 'locale'.")
    unknown = set(changes) - {"webhook_url", "locale"}
    if unknown:
        raise InvalidInput("INVALID_BODY", "Only 'webhook_url' and 'locale' can be changed, not %s." % ", ".join(sorted(unknown)))
    if "locale" in changes and changes["locale"] not in ("en", "ru", None):
        raise InvalidInput("INVALID_LOCALE", "locale must be 'en' or 'ru'.")
    webhook_url = _checked_webhook_url(changes["webhook_url"]) if "webhook_url" in changes else None
    user = db.session.get(User, g.user.id)
    if "locale" in changes:
        user.locale = changes["locale"]
    if "webhook_url" in changes:
        user.webhook_url = webhook_url
        if webhook_url is None:
            notify.end_pending_deliveries(user.id)
    db.session.commit()
    return jsonify(profile(user))


def _checked_webhook_url(url: object) -> str | None:
    if url is None or url == "":
        return None
    if not isinstance(url, str) or len(url) > 2000:
        raise InvalidInput("INVALID_WEBHOOK_URL", "webhook_url must be a string URL of at most 2000 characters.")
    if not settings().webhook_secret:
        raise InvalidInput("WEBHOOKS_DISABLED", "This server has no WEBHOOK_SECRET, so it cannot sign webhooks.")
    try:
        return check_url(url, settings().webhook_allowed_networks)
    except UnsafeUrl as error:
        raise InvalidInput("INVALID_WEBHOOK_URL", str(error)) from None


@blueprint.get("/api/me/notifications")
@login_required
def notifications() -> Response:
    limit = whole_number(request.args.get("limit", "50"), "limit", 1, 200)
    items = [{
        "id": item.id,
        "job_id": str(item.job_id),
        "event": item.event,
        "payload": item.payload,
        "webhook_id": item.webhook_id,
        "delivered_at": iso(item.delivered_at),
        "delivery": {"state": notify.delivery_state(item), "attempts": item.delivery_attempts,
                     "last_error": item.last_delivery_error},
        "created_at": iso(item.created_at),
    } for item in notify.inbox(g.user.id, limit)]
    return jsonify({"items": items})


@blueprint.post("/api/me/safety-agreement")
@login_required
def agree_to_safety_rules() -> Response:
    user = db.session.get(User, g.user.id)
    if user.safety_agreed_at is None:
        user.safety_agreed_at = func.now()
        db.session.commit()
    return jsonify(profile(user))
