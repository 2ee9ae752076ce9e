"""`flask --app webapp users ...`: creating users and their tokens, credits, and limits;
`flask --app webapp jobs retry ...`: replaying failed jobs."""
from __future__ import annotations

import getpass
import time

import click
from flask import Flask
from flask.cli import AppGroup
from sqlalchemy import select

from renderq import billing, notify
from renderq.db import db
from renderq.errors import DomainError
from renderq.jobs import replay
from renderq.models import User
from renderq.runtime import settings
from renderq.webhook_http import UnsafeUrl, check_url
from webapp.auth import new_token

users = AppGroup("users", help="Create users and their API tokens; top up credits; set limits.")


@users.command("create")
@click.option("--email", required=True, help="The user's e-mail address (unique).")
@click.option("--admin", is_flag=True, help="May read every user's jobs and the admin endpoints.")
@click.option("--balance", type=click.IntRange(min=0), default=0, show_default=True, help="Starting credits.")
@click.option("--locale", type=click.Choice(["ru", "en"]), default=None, help="Language of messages.")
@click.option("--webhook-url", default=None, help="Where notifications are POSTed (needs WEBHOOK_SECRET).")
def create_user(email: str, admin: bool, balance: int, locale: str | None, webhook_url: str | None) -> None:
    """Create a user and print their API token alone on the last line."""
    if db.session.execute(select(User.id).where(User.email == email)).first():
        raise click.UsageError("a user with e-mail %s already exists" % email)
    token, digest = new_token()
    user = User(email=email, token_hash=digest, is_admin=admin, balance=0, held=0, locale=locale,
                webhook_url=_webhook_url(webhook_url))
    db.session.add(user)
    db.session.flush()
    if balance:
        billing.top_up(user, balance)
    db.session.commit()
    click.echo("created user %d (%s)%s" % (user.id, email, ", admin" if admin else ""))
    click.echo(token)


def _webhook_url(url: str | None) -> str | None:
    if not url:
        return None
    if not settings().webhook_secret:
        raise click.UsageError("set WEBHOOK_SECRET (whsec_...) before giving users a webhook URL")
    try:
        return check_url(url, settings().webhook_allowed_networks)
    except UnsafeUrl as error:
        raise click.UsageError(str(error)) from None


def _user(email: str) -> User:
    user = db.session.execute(select(User).where(User.email == email).with_for_update()).scalar()
    if user is None:
        raise click.UsageError("no user with e-mail %s" % email)
    return user


@users.command("topup")
@click.option("--email", required=True)
@click.option("--amount", type=click.IntRange(min=1), required=True, help="Credits to add.")
def top_up(email: str, amount: int) -> None:
    """Add credits to a user's balance (a ledger entry)."""
    user = _user(email)
    billing.top_up(user, amount)
    db.session.commit()
    click.echo("user %d balance %d (available %d)" % (user.id, user.balance, user.balance - user.held))


@users.command("update")
@click.option("--email", required=True)
@click.option("--webhook-url", default=None, help="Where notifications are POSTed; '' removes it.")
@click.option("--locale", type=click.Choice(["ru", "en"]), default=None)
def update_user(email: str, webhook_url: str | None, locale: str | None) -> None:
    """Change a user's webhook URL or locale."""
    user = _user(email)
    if webhook_url is not None:
        user.webhook_url = _webhook_url(webhook_url)
        if user.webhook_url is None:
            notify.end_pending_deliveries(user.id)
    if locale is not None:
        user.locale = locale
    db.session.commit()
    click.echo("user %d updated" % user.id)


@users.command("set-limit")
@click.option("--email", required=True)
@click.option("--max-inflight", type=click.IntRange(min=0), required=True,
              help="Generator calls this user may have in flight at once, and their weight in the fair "
                   "schedule (3 = three turns to a default user's one); 0 restores the default.")
def set_limit(email: str, max_inflight: int) -> None:
    """Set a user's share of the generator."""
    user = _user(email)
    user.max_inflight = max_inflight or None
    db.session.commit()
    click.echo("user %d max_inflight %s" % (user.id, user.max_inflight or "default"))


jobs = AppGroup("jobs", help="Operate on jobs in bulk.")


@jobs.command("retry")
@click.option("--error-code", default=None, help="Only jobs that failed with this internal code (GENERATOR_BUSY, "
              "TIME_LIMIT, WORKER_LOST, TOO_OLD, INVALID_INPUT, ...) or GENERATOR_UNAVAILABLE: every failure "
              "that was not the user's input.")
@click.option("--failed-after", default=None, help="Only jobs that failed at or after this ISO 8601 time with a "
              "UTC offset (2026-11-28T14:00:00Z).")
@click.option("--failed-before", default=None, help="Only jobs that failed before this time.")
@click.option("--kind", default=None, help="Only jobs of this kind.")
@click.option("--user-email", default=None, help="Only this user's jobs.")
@click.option("--limit", type=int, required=True, help="The most failed jobs examined, oldest failure first "
              "(at most %d)." % replay.MAX_LIMIT)
@click.option("--dry-run", is_flag=True, help="Say what would be replayed and skipped; change nothing.")
def retry_jobs(error_code: str | None, failed_after: str | None, failed_before: str | None, kind: str | None,
               user_email: str | None, limit: int, dry_run: bool) -> None:
    """Replay failed jobs: each goes back to pending with fresh counters and a new hold of its
    price, or is skipped with the reason (a user without the credit, for one)."""
    user_id = None
    if user_email is not None:
        user_id = db.session.execute(select(User.id).where(User.email == user_email)).scalar()
        if user_id is None:
            raise click.UsageError("no user with e-mail %s" % user_email)
    body = {"error_code": error_code, "failed_after": failed_after, "failed_before": failed_before, "kind": kind,
            "user_id": user_id, "limit": limit, "dry_run": dry_run}
    started = time.monotonic()
    try:
        spec, dry_run = replay.parse_request({name: value for name, value in body.items() if value is not None})
        report = replay.replay(spec, dry_run=dry_run, requested_by="cli:%s" % getpass.getuser())
    except DomainError as error:
        raise click.UsageError(error.message) from None
    _print_report(report, time.monotonic() - started)


def _print_report(report: replay.ReplayReport, seconds: float) -> None:
    if report.dry_run:
        click.echo("dry run: would replay %d failed job(s), skip %d; would hold %d credit(s); nothing changed"
                   % (len(report.replayed), len(report.skipped), report.credits_held))
    else:
        click.echo("replay %d: replayed %d failed job(s), skipped %d; held %d credit(s) in %.2f s"
                   % (report.replay_id, len(report.replayed), len(report.skipped), report.credits_held, seconds))
    for reason, count in sorted(report.skipped_reasons.items()):
        click.echo("skipped %d: %s (%s)" % (count, reason, replay.SKIP_REASONS[reason]))
    for skip in report.skipped:
        click.echo("  %s user %d %s" % (skip.job_id, skip.user_id, skip.reason))


def register(app: Flask) -> None:
    app.cli.add_command(users)
    app.cli.add_command(jobs)
