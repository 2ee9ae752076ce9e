"""`flask --app webapp users ...`: the only way to create users and their tokens."""
from __future__ import annotations

import click
from flask import Flask
from flask.cli import AppGroup
from sqlalchemy import select

from webapp.auth import new_token
from webapp.extensions import db
from webapp.models import User

users = AppGroup("users", help="Create users and their API tokens.")


@users.command("create")
@click.option("--email", required=True, help="The user's e-mail address (unique).")
@click.option("--admin", is_flag=True, help="May read every user's jobs and the admin endpoints.")
@click.option("--balance", type=click.IntRange(min=0), default=0, show_default=True, help="Starting credits.")
@click.option("--locale", type=click.Choice(["ru", "en"]), default=None, help="Language of messages.")
def create_user(email: str, admin: bool, balance: int, locale: str | None) -> None:
    """Create a user and print their API token alone on the last line."""
    if db.session.execute(select(User.id).where(User.email == email)).first():
        raise click.UsageError("a user with e-mail %s already exists" % email)
    token, digest = new_token()
    user = User(email=email, token_hash=digest, is_admin=admin, balance=balance, locale=locale)
    db.session.add(user)
    db.session.commit()
    click.echo("created user %d (%s)%s" % (user.id, email, ", admin" if admin else ""))
    click.echo(token)


def register(app: Flask) -> None:
    app.cli.add_command(users)
