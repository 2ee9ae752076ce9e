"""The `renderq` command: submit photos, follow jobs, fetch results, from a shell.

Exit codes: 0 done (for a job: it succeeded); 1 the API refused the request or could not be
reached (the message says why); 2 a usage error; 3 the job ended without a result (blocked,
failed or canceled); 4 `--timeout` passed before the job finished; 130 interrupted.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import IO, Any, Callable, Dict, Optional, Sequence

from renderq_client import __version__
from renderq_client.client import Client
from renderq_client.errors import RenderqError, WaitTimeout
from renderq_client.models import Account, Job

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NO_RESULT, EXIT_TIMEOUT, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130
DEFAULT_URL = "http://127.0.0.1:5000"  # where bin/run serves the API


class UsageError(Exception):
    pass


def main(argv: Optional[Sequence[str]] = None) -> int:
    # A block message carries an emoji; a terminal or pipe that cannot show it gets an escape, not a
    # crash. Line buffering keeps stdout's lines in order with the status lines on stderr in `2>&1 | tee`.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace", line_buffering=True)
    arguments = build_parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int] = arguments.run
    try:
        return run(arguments)
    except UsageError as error:
        print("renderq: %s" % error, file=sys.stderr)
        return EXIT_USAGE
    except WaitTimeout as error:
        print("renderq: %s The job carries on: renderq wait %s" % (error.message, arguments.job_id_shown),
              file=sys.stderr)
        return EXIT_TIMEOUT
    except RenderqError as error:
        print("renderq: error: %s" % error, file=sys.stderr)
        return EXIT_ERROR
    except OSError as error:  # the photo or the output file
        print("renderq: error: %s" % error, file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        shown = getattr(arguments, "job_id_shown", None)
        print("\nrenderq: interrupted%s" % ("; the job carries on: renderq wait %s" % shown if shown else ""),
              file=sys.stderr)
        return EXIT_INTERRUPTED


def build_parser() -> argparse.ArgumentParser:
    # --url and --token work before or after the command; SUPPRESS keeps a subcommand's unset
    # option from overwriting a value given before the command.
    connection = argparse.ArgumentParser(add_help=False)
    connection.add_argument("--url", default=argparse.SUPPRESS,
                            help="the renderq server (default: $RENDERQ_URL, else %s)" % DEFAULT_URL)
    connection.add_argument("--token", default=argparse.SUPPRESS, help="API token (default: $RENDERQ_TOKEN)")

    parser = argparse.ArgumentParser(prog="renderq", parents=[connection],
                                     description="Submit photos to renderq and follow the jobs.",
                                     epilog="Exit codes: 0 done, 1 request refused or server unreachable, "
                                            "2 usage, 3 job blocked, failed or canceled, 4 timed out waiting.")
    parser.add_argument("--version", action="version", version="renderq-client %s" % __version__)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, run: Callable[[argparse.Namespace], int], help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, parents=[connection], help=help_text, description=help_text)
        sub.set_defaults(run=run, job_id_shown=None)
        return sub

    submit = command("submit", run_submit, "upload a photo and start a job on it")
    submit.add_argument("photo", type=Path, help="a JPEG, PNG or WebP file")
    submit.add_argument("--style", help="sketch, sepia, cartoon, pixelate or unfiltered (server default: sketch)")
    submit.add_argument("--prompt")
    submit.add_argument("--kind", help="job kind (server default: photo.render)")
    submit.add_argument("--idempotency-key", help="resubmitting with the same key returns the same job")
    add_wait_options(submit, "wait for the job to finish, showing its status")

    status = command("status", run_status, "show a job")
    status.add_argument("job_id")
    status.add_argument("--json", action="store_true", help="the job resource as JSON")

    wait = command("wait", run_wait, "wait for a job to finish, showing its status")
    wait.add_argument("job_id")
    add_wait_options(wait, None)

    result = command("result", run_result, "save a finished job's PNG")
    result.add_argument("job_id")
    result.add_argument("-o", "--output", type=Path, required=True, help="where to write the PNG")

    jobs = command("jobs", run_jobs, "list your jobs, newest first")
    jobs.add_argument("--status", help="only jobs in this status (pending, processing, retrying, "
                                       "pending_background_retry, completed, failed, canceled)")
    jobs.add_argument("--kind")
    jobs.add_argument("--limit", type=int, default=20, help="at most this many (default 20)")
    jobs.add_argument("--json", action="store_true", help="one job resource as JSON per line")

    cancel = command("cancel", run_cancel, "cancel a job that has not finished")
    cancel.add_argument("job_id")

    me = command("me", run_me, "show your account: balance and available credits")
    me.add_argument("--json", action="store_true")
    return parser


def add_wait_options(sub: argparse.ArgumentParser, wait_flag_help: Optional[str]) -> None:
    if wait_flag_help:
        sub.add_argument("--wait", action="store_true", help=wait_flag_help)
    sub.add_argument("-o", "--output", type=Path, help="save the PNG here once the job succeeds (implies --wait)")
    sub.add_argument("--timeout", type=float, help="give up waiting after this many seconds")


def client_for(arguments: argparse.Namespace) -> Client:
    url = getattr(arguments, "url", None) or os.environ.get("RENDERQ_URL") or DEFAULT_URL
    token = getattr(arguments, "token", None) or os.environ.get("RENDERQ_TOKEN")
    if not token:
        raise UsageError("no API token: set RENDERQ_TOKEN or pass --token")
    return Client(url, token)


# --- commands ----------------------------------------------------------------------------------

def run_submit(arguments: argparse.Namespace) -> int:
    client = client_for(arguments)
    job = client.submit_photo(arguments.photo, style=arguments.style, prompt=arguments.prompt, kind=arguments.kind,
                              idempotency_key=arguments.idempotency_key)
    arguments.job_id_shown = job.id
    print("Submitted %s: job %s (%s, %s)." % (arguments.photo.name, job.id, job.kind, credits(job.price)))
    if not (arguments.wait or arguments.output):
        print(describe(job))
        return EXIT_OK
    return follow(client, job.id, arguments.timeout, arguments.output)


def run_wait(arguments: argparse.Namespace) -> int:
    arguments.job_id_shown = arguments.job_id
    return follow(client_for(arguments), arguments.job_id, arguments.timeout, arguments.output)


def run_status(arguments: argparse.Namespace) -> int:
    job = client_for(arguments).get(arguments.job_id)
    if arguments.json:
        print(json.dumps(dict(job.raw), indent=2, ensure_ascii=False))
    else:
        print_fields(job_fields(job))
    return EXIT_OK


def run_result(arguments: argparse.Namespace) -> int:
    png = client_for(arguments).result(arguments.job_id)
    arguments.output.write_bytes(png)
    print("Saved %s (%d bytes)." % (arguments.output, len(png)))
    return EXIT_OK


def run_jobs(arguments: argparse.Namespace) -> int:
    if arguments.limit < 1:
        raise UsageError("--limit must be at least 1")
    found = 0
    for job in client_for(arguments).jobs(status=arguments.status, kind=arguments.kind, limit=arguments.limit):
        found += 1
        if arguments.json:
            print(json.dumps(dict(job.raw), ensure_ascii=False))
        else:
            print("%s  %s  %-14s %s" % (job.id, clock(job.created_at, seconds=False), job.kind, describe(job)))
    if not found and not arguments.json:
        print("No jobs%s." % (" with status %s" % arguments.status if arguments.status else ""))
    return EXIT_OK


def run_cancel(arguments: argparse.Namespace) -> int:
    job = client_for(arguments).cancel(arguments.job_id)
    print("Job %s: %s." % (job.id, describe(job)))
    return EXIT_OK


def run_me(arguments: argparse.Namespace) -> int:
    account = client_for(arguments).me()
    if arguments.json:
        print(json.dumps(dict(account.raw), indent=2, ensure_ascii=False))
    else:
        print_fields(account_fields(account))
    return EXIT_OK


# --- following a job ---------------------------------------------------------------------------

def follow(client: Client, job_id: str, timeout: Optional[float], output: Optional[Path]) -> int:
    """Wait for the job with a live status line, then report how it ended (and save the PNG)."""
    line = StatusLine(sys.stderr)
    try:
        job = client.wait(job_id, timeout=timeout, on_update=line.show)
    finally:
        line.finish()
    if job.succeeded:
        if output is not None:
            png = client.result(job.id)
            output.write_bytes(png)
            print("Completed: saved %s (%d bytes)." % (output, len(png)))
        else:
            print("Completed. Save the PNG with: renderq result %s --output result.png" % job.id)
        return EXIT_OK
    if job.blocked:
        print("Blocked: %s" % (job.message or job.block_reason))
    elif job.status == "failed":
        print("Failed: %s" % (job.error.message if job.error else "the job failed"))
    else:
        print("Canceled.")
    return EXIT_NO_RESULT


class StatusLine:
    """The job's status while waiting: rewritten in place on a terminal, one line per change
    when the output is a file or a pipe (a log should not fill with carriage returns)."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.in_place = stream.isatty()
        self.shown = ""

    def show(self, job: Job) -> None:
        text = "%s  %s" % (job.id[:8], describe(job))
        if text == self.shown:
            return
        if self.in_place:
            self.stream.write("\r\x1b[K" + text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
        self.shown = text

    def finish(self) -> None:
        if self.in_place and self.shown:
            self.stream.write("\n")
            self.stream.flush()


def describe(job: Job) -> str:
    """One line a person can read: the status and whatever matters in it."""
    parts = [job.status.replace("_", " ")]
    if job.status == "pending" and job.queue_position is not None:
        parts.append("%d ahead in the queue" % job.queue_position)
    elif job.status == "processing":
        parts.append("attempt %d" % job.attempts)
    elif job.status in ("retrying", "pending_background_retry"):
        parts.append("%s so far" % plural(job.attempts, "attempt"))
        if job.next_retry_at:
            parts.append("next retry at %s" % clock(job.next_retry_at))
        if job.error:
            parts.append(job.error.message)
    elif job.blocked:
        parts = ["blocked", job.message or job.block_reason or ""]
    elif job.status == "completed":
        parts = ["completed"]
    elif job.status == "failed":
        parts.append("after %s" % plural(job.attempts, "attempt"))
        if job.error:
            parts.append(job.error.message)
    return " · ".join(part for part in parts if part)


def job_fields(job: Job) -> Dict[str, Any]:
    fields: Dict[str, Any] = {
        "id": job.id, "kind": job.kind, "status": job.status, "outcome": job.outcome,
        "queue position": job.queue_position, "attempts": job.attempts,
        "background tries": job.retry_count or None,
        "next retry": clock(job.next_retry_at) if job.next_retry_at else None,
        "error": "%s: %s" % (job.error.code, job.error.message) if job.error else None,
        "message": job.message, "price": credits(job.price), "photo": job.photo_id, "result": job.result_url,
        "created": job.created_at, "started": job.started_at, "completed": job.completed_at,
    }
    return {name: value for name, value in fields.items() if value is not None}


def account_fields(account: Account) -> Dict[str, Any]:
    fields: Dict[str, Any] = {
        "id": account.id, "email": account.email, "balance": credits(account.balance),
        "available": credits(account.available), "locale": account.locale,
        "admin": "yes" if account.is_admin else None, "webhook": account.webhook_url,
        "safety rules": "agreed %s" % account.safety_agreed_at.isoformat() if account.safety_agreed_at else None,
    }
    return {name: value for name, value in fields.items() if value is not None}


def print_fields(fields: Dict[str, Any]) -> None:
    width = max(len(name) for name in fields)
    for name, value in fields.items():
        print("%-*s  %s" % (width, name, value.isoformat() if isinstance(value, datetime) else value))


def clock(moment: Optional[datetime], seconds: bool = True) -> str:
    """A time as the reader's local wall clock."""
    if moment is None:
        return "-"
    local = moment.astimezone()
    return local.strftime("%H:%M:%S") if seconds else local.strftime("%Y-%m-%d %H:%M")


def credits(amount: int) -> str:
    return plural(amount, "credit")


def plural(count: int, noun: str) -> str:
    return "%d %s%s" % (count, noun, "" if count == 1 else "s")


if __name__ == "__main__":
    raise SystemExit(main())
