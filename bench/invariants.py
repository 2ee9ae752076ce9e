"""The invariants a renderq run must keep, checked from what it left behind: PostgreSQL's rows,
the reference generator's call log (GENERATOR_CALL_LOG), the chaos webhook receivers' log
(bench/receivers.py), and the answers the clients got.

    .venv/bin/python bench/invariants.py --database-url postgresql://... --call-log calls.jsonl \\
        --receivers-log receivers.jsonl [--submissions-log submissions.jsonl] \\
        [--web-url http://127.0.0.1:5000 --admin-token T | --media-root var/media] [--slack 90]
    .venv/bin/python bench/invariants.py --self-test

The ladder's settings (RETRY_DELAYS, MAX_RETRIES, MAX_RETRY_ATTEMPTS, JOB_LEASE_SECONDS,
QUEUE_CHECK_INTERVAL, BACKGROUND_PROCESSING_INTERVAL, MAX_BACKGROUND_RETRY_AGE,
NOTIFY_ON_FAILURE) are read from the environment, as the stack read them: run the checker
with the stack's environment, or give --env-file (bench/chaos.py leaves one, stack.env). It
prints every invariant with its figure and its violations, and exits 1 if any is violated.
Results are read through the API (--web-url, --admin-token) or, with STORAGE_BACKEND=filesystem,
from --media-root.

How generator calls are counted against recorded attempts (`calls-match-attempts`)
---------------------------------------------------------------------------------
`jobs.attempts` counts claims: attempt number n is the n-th claim of the job, and each claim
makes at most one generator call. `job_attempts` has a row per attempt, written by the
attempt itself when it ends, or written by the reconciler with outcome `lost` when the
attempt's worker stopped renewing its lease (the checker does not rely on that row's time).
An attempt is *answered* when its own row records an answer only the generator could have
given: succeeded, blocked, failed, or transient with an HTTP error (GENERATOR_BUSY, a 429, a
5xx). It is *cut off* when its only rows are `lost`, or a transient GENERATOR_UNREACHABLE,
GENERATOR_TIMEOUT or TIME_LIMIT: such an attempt may or may not have reached the generator
(a worker killed before or during its call; a connection refused or reset; a request the
generator started after the caller gave up). A number with both an own row and a `lost`
row (the attempt recorded itself, then could not move the job on, and was recovered) counts
once, as its own row says.

The calls of a job, in order of their start, are matched to its attempt numbers in order:
an answered attempt takes exactly one call that started within its recorded interval
(0.5 s either side); the calls between two answered attempts go to the cut-off attempts
between them, at most one each. Violations: a call left over (a call no attempt explains:
an attempt ran without a claim, or twice); an answered attempt with no call (an answer the
generator never gave); a call that could only belong to a claimed number with no row at all
(a call the history lost; except the attempt of a job `processing` now, which writes its row
when it ends); a row for a number beyond `jobs.attempts`; one number recorded twice by the
attempt itself.

`generator calls = answered attempts + the cut-off attempts that reached the generator`,
and no job's calls exceed 1 + MAX_RETRIES + MAX_RETRY_ATTEMPTS (`calls-at-most-9`).

The bound of `terminal-in-time`
-------------------------------
A job submitted at t must be terminal by

    t + ladder + time in attempts + recoveries + background + slack

where ladder = the sum of the fast ladder's delays (each at least --retry-after-max, the
longest Retry-After a 429 may ask); time in attempts = the durations its own attempt rows
recorded; recoveries = (JOB_LEASE_SECONDS + 2 x QUEUE_CHECK_INTERVAL) per lost attempt;
background = MAX_BACKGROUND_RETRY_AGE + BACKGROUND_PROCESSING_INTERVAL once the fast ladder is
used up (the age limit is what ends a background wait, whatever the contention for its
slots); slack (--slack) covers queueing and what a fault costs beyond that (a lost message
re-sent, a PostgreSQL restart waited out). A job first attempted long after its submission
shows in the violation ("first attempt N s after submission"): a backlog, or a lost message.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.receivers import ACCEPTING_MODES, REDIRECT_TARGET, mode_of  # noqa: E402

TERMINAL = frozenset({"completed", "failed", "canceled"})
ANSWER_TOLERANCE = 0.5  # seconds: a call's start may sit this far outside its attempt's recorded interval
CUT_OFF_CODES = frozenset({"GENERATOR_UNREACHABLE", "GENERATOR_TIMEOUT", "TIME_LIMIT"})


# ---------------------------------------------------------------------------------------------
# What a run left behind
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class JobRow:
    id: str
    user_id: int
    kind: str
    price: int
    status: str
    outcome: Optional[str]
    attempts: int
    retry_count: int
    created: float
    started: Optional[float]  # the first claim
    completed: Optional[float]
    result_path: Optional[str]
    error_code: Optional[str]
    prompt: str = ""
    style: str = ""

    def label(self) -> str:
        what = " ".join(part for part in (self.kind, self.style, repr(self.prompt) if self.prompt else "") if part)
        return "job %s (%s, user %d)" % (self.id, what, self.user_id)


@dataclass(frozen=True)
class AttemptRow:
    job_id: str
    number: int
    outcome: str
    error_code: Optional[str]
    start: float
    duration: float

    @property
    def end(self) -> float:
        return self.start + self.duration

    @property
    def answered(self) -> bool:
        """The row records an answer only the generator could have given."""
        return self.outcome != "lost" and (self.error_code or "") not in CUT_OFF_CODES


@dataclass(frozen=True)
class LedgerRow:
    user_id: int
    job_id: Optional[str]
    entry_type: str
    amount: int


@dataclass(frozen=True)
class NotificationRow:
    id: int
    user_id: int
    job_id: str
    event: str
    webhook_id: str
    delivered: Optional[float]
    delivery_attempts: int


@dataclass(frozen=True)
class UserRow:
    id: int
    email: str
    balance: int
    held: int
    webhook_url: Optional[str]


@dataclass(frozen=True)
class Call:
    call_id: str
    job_id: str
    start: float
    end: Optional[float]  # None: the generator went away mid-call
    status: Optional[int]
    fault: Optional[str]


@dataclass(frozen=True)
class Delivery:
    webhook_id: str
    mode: str
    path: str
    start: float
    end: float
    status: int
    answered: bool  # the receiver sent a complete status line and headers
    completed: bool  # ... and the whole body
    signature_ok: bool


@dataclass
class Dataset:
    jobs: dict[str, JobRow]
    attempts: dict[str, list[AttemptRow]]
    ledger: list[LedgerRow]
    notifications: list[NotificationRow]
    users: dict[int, UserRow]
    checked_at: float
    calls: Optional[list[Call]] = None
    deliveries: Optional[list[Delivery]] = None
    accepted: Optional[list[str]] = None


def _seconds(value: object) -> Optional[float]:
    return None if value is None else float(value)


def load_database(connection) -> Dataset:
    """Every row the invariants read, through `connection` (psycopg), as one consistent snapshot."""
    def rows(sql: str) -> list[tuple]:
        return connection.execute(sql).fetchall()

    from psycopg.pq import TransactionStatus

    outermost = connection.info.transaction_status == TransactionStatus.IDLE
    with connection.transaction():
        if outermost:  # a caller's open transaction (the self-test's) is a snapshot of its own already
            connection.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        (checked_at,), = rows("SELECT extract(epoch FROM clock_timestamp())")
        jobs = {}
        for (job_id, user_id, kind, price, status, outcome, attempts, retry_count, created, started, completed,
             result_path, error_code, params) in rows(
                "SELECT id::text, user_id, kind, price, status, outcome, attempts, retry_count,"
                " extract(epoch FROM created_at), extract(epoch FROM started_at), extract(epoch FROM completed_at),"
                " result_path, error_code, params FROM jobs"):
            params = params if isinstance(params, dict) else json.loads(params or "{}")
            jobs[job_id] = JobRow(job_id, user_id, kind, price, status, outcome, attempts, retry_count,
                                  float(created), _seconds(started), _seconds(completed), result_path, error_code,
                                  params.get("prompt") or "", params.get("style") or "")
        attempts: dict[str, list[AttemptRow]] = defaultdict(list)
        for job_id, number, outcome, error_code, started, duration_ms in rows(
                "SELECT job_id::text, number, outcome, error_code, extract(epoch FROM started_at), duration_ms"
                " FROM job_attempts ORDER BY started_at, id"):
            attempts[job_id].append(AttemptRow(job_id, number, outcome, error_code, float(started), duration_ms / 1000))
        ledger = [LedgerRow(*row) for row in rows(
            "SELECT user_id, job_id::text, entry_type, amount FROM ledger_entries ORDER BY id")]
        notifications = [NotificationRow(nid, user_id, job_id, event, webhook_id, _seconds(delivered), attempts_)
                         for nid, user_id, job_id, event, webhook_id, delivered, attempts_ in rows(
                             "SELECT id, user_id, job_id::text, event, webhook_id, extract(epoch FROM delivered_at),"
                             " delivery_attempts FROM notifications ORDER BY id")]
        users = {row[0]: UserRow(*row) for row in rows("SELECT id, email, balance, held, webhook_url FROM users")}
    return Dataset(jobs, dict(attempts), ledger, notifications, users, float(checked_at))


def _json_lines(path: Path) -> Iterable[dict]:
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if line:
                try:
                    yield json.loads(line)
                except ValueError:  # a line cut short by a writer killed mid-write: not a record
                    continue


def read_call_log(path: Path) -> list[Call]:
    """The generator's calls: a start line and, unless the generator died mid-call, an end line."""
    calls: dict[str, dict] = {}
    for record in _json_lines(path):
        calls.setdefault(record["call"], {}).update(record)
    return [Call(record["call"], record["job_id"], record["start"], record.get("end"), record.get("status"),
                 record.get("fault")) for record in calls.values()]


def read_receivers_log(path: Path) -> list[Delivery]:
    return [Delivery(record["webhook_id"], record["mode"], record["path"], record["start"], record["end"],
                     record["status"], record.get("answered", record["completed"]), record["completed"],
                     record["signature_ok"]) for record in _json_lines(path)]


def read_submissions_log(path: Path) -> list[str]:
    """The job ids the API accepted (202, or a replayed Idempotency-Key's 200/202)."""
    return [record["job_id"] for record in _json_lines(path) if record.get("job_id")]


# ---------------------------------------------------------------------------------------------
# The settings the bounds come from
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Limits:
    retry_delays: tuple[float, ...]
    max_retries: int
    max_retry_attempts: int
    background_interval: float
    background_age: float
    lease: float
    queue_check_interval: float
    notify_on_failure: bool
    retry_after_max: float = 1.0
    slack: float = 60.0

    @property
    def max_calls(self) -> int:
        return 1 + self.max_retries + self.max_retry_attempts

    @property
    def ladder(self) -> float:
        return sum(max(delay, self.retry_after_max) for delay in self.retry_delays[:self.max_retries])

    @property
    def recovery(self) -> float:
        return self.lease + 2 * self.queue_check_interval

    @classmethod
    def from_env(cls, env: Mapping[str, str], **overrides: float) -> "Limits":
        from config.settings import load_settings

        settings = load_settings(env)
        return cls(settings.retry_delays, settings.max_retries, settings.max_retry_attempts,
                   settings.background_processing_interval_ms / 1000, settings.max_background_retry_age_ms / 1000,
                   settings.job_lease_seconds, settings.queue_check_interval, settings.notify_on_failure,
                   **overrides)


# ---------------------------------------------------------------------------------------------
# The invariants
# ---------------------------------------------------------------------------------------------

@dataclass
class Verdict:
    name: str
    rule: str
    figure: str = ""
    violations: list[str] = field(default_factory=list)
    checked: bool = True

    @property
    def ok(self) -> bool:
        return not self.violations


def _clock(epoch: Optional[float]) -> str:
    if epoch is None:
        return "-"
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%H:%M:%S.%f")[:-3]


def bound_of(job: JobRow, rows: list[AttemptRow], limits: Limits) -> float:
    """The latest moment `job` may become terminal (see the module's docstring)."""
    return bound_from(job.created, job.attempts, sum(row.duration for row in rows if row.outcome != "lost"),
                      sum(1 for row in rows if row.outcome == "lost"), limits)


def bound_from(created: float, attempts: int, in_attempts: float, lost: int, limits: Limits) -> float:
    """The bound from the figures it is made of: submission time, claims, seconds the attempts
    recorded, attempts recorded lost."""
    background = (limits.background_age + limits.background_interval) if attempts >= 1 + limits.max_retries else 0
    return created + limits.ladder + in_attempts + limits.recovery * lost + background + limits.slack


def _first_attempt(job: JobRow) -> str:
    """When the job was first claimed: a late first claim is a queue (a backlog, or a lost message)."""
    if job.started is None:
        return "never attempted"
    return "first attempt %.1fs after submission" % (job.started - job.created)


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def terminal_in_time(data: Dataset, limits: Limits) -> Verdict:
    verdict = Verdict("terminal-in-time", "every job is terminal by submission + ladder + time in attempts + "
                                          "recoveries + background + %gs slack" % limits.slack)
    spare, took = [], []
    for job in data.jobs.values():
        bound = bound_of(job, data.attempts.get(job.id, []), limits)
        if job.status not in TERMINAL:
            verdict.violations.append("%s is still %s at check time (%d attempts, %s, submitted %.0fs before the "
                                      "check, %s)" % (job.label(), job.status, job.attempts, _first_attempt(job),
                                                      data.checked_at - job.created,
                                                      "%.0fs past its bound" % (data.checked_at - bound)
                                                      if data.checked_at > bound else
                                                      "its bound is %.0fs away" % (bound - data.checked_at)))
        elif job.completed is not None and job.completed > bound:
            verdict.violations.append("%s became %s %.1fs after submission, %.1fs past its bound of %.1fs (%d "
                                      "attempts, %s)" % (job.label(), job.status, job.completed - job.created,
                                                         job.completed - bound, bound - job.created, job.attempts,
                                                         _first_attempt(job)))
        elif job.completed is not None:
            spare.append(bound - job.completed)
            took.append(job.completed - job.created)
    verdict.figure = "%d/%d jobs terminal within their bound" % (len(spare), len(data.jobs))
    if took:
        verdict.figure += "; slowest %.1fs after submission; least time to spare %.1fs" % (max(took), min(spare))
    waits = [job.started - job.created for job in data.jobs.values() if job.started is not None]
    if waits:
        verdict.figure += "; first attempt after p50 %.1fs, p95 %.1fs, max %.1fs" % (
            _percentile(waits, 0.5), _percentile(waits, 0.95), max(waits))
    return verdict


def _calls_by_job(data: Dataset) -> dict[str, list[Call]]:
    calls: dict[str, list[Call]] = defaultdict(list)
    for call in data.calls or []:
        calls[call.job_id].append(call)
    for job_calls in calls.values():
        job_calls.sort(key=lambda call: call.start)
    return calls


def calls_at_most(data: Dataset, limits: Limits) -> Verdict:
    verdict = Verdict("calls-at-most-%d" % limits.max_calls,
                      "no job calls the generator more than 1 + MAX_RETRIES + MAX_RETRY_ATTEMPTS = %d times"
                      % limits.max_calls)
    if data.calls is None:
        verdict.checked, verdict.figure = False, "no generator call log"
        return verdict
    per_job = Counter({job_id: len(calls) for job_id, calls in _calls_by_job(data).items() if job_id in data.jobs})
    for job_id, count in per_job.items():
        if count > limits.max_calls:
            verdict.violations.append("%s: %d generator calls" % (data.jobs[job_id].label(), count))
    histogram = Counter(per_job.get(job_id, 0) for job_id in data.jobs)
    verdict.figure = "most calls for one job: %d; jobs by calls: %s" % (
        max(histogram) if histogram else 0, ", ".join("%d: %d" % item for item in sorted(histogram.items())))
    return verdict


def calls_match_attempts(data: Dataset, limits: Limits) -> Verdict:
    verdict = Verdict("calls-match-attempts", "generator calls = answered attempts + the cut-off attempts "
                                              "(lost, unreachable, timed out) that reached the generator")
    if data.calls is None:
        verdict.checked, verdict.figure = False, "no generator call log"
        return verdict
    calls_by_job = _calls_by_job(data)
    tally = Counter()
    for job_id, calls in calls_by_job.items():
        if job_id not in data.jobs:
            for call in calls:
                verdict.violations.append("generator call at %s for job %s, which the database does not have"
                                          % (_clock(call.start), job_id))
    for job in data.jobs.values():
        rows = data.attempts.get(job.id, [])
        calls = calls_by_job.get(job.id, [])
        tally["calls"] += len(calls)
        tally["claims"] += job.attempts
        tally["rows"] += len(rows)
        tally["lost rows"] += sum(1 for row in rows if row.outcome == "lost")
        for problem in _match_calls(job, rows, calls, tally):
            verdict.violations.append("%s: %s" % (job.label(), problem))
    verdict.figure = ("%d generator calls = %d by answered attempts + %d by %d cut-off attempts (+ %d unexplained); "
                      "%d claims (jobs.attempts), %d history rows (%d lost)"
                      % (tally["calls"], tally["answered"], tally["cut-off calls"], tally["cut-off"],
                         tally["unexplained"], tally["claims"], tally["rows"], tally["lost rows"]))
    return verdict


def _match_calls(job: JobRow, rows: list[AttemptRow], calls: list[Call], tally: Counter) -> list[str]:
    problems = []
    by_number: dict[int, list[AttemptRow]] = defaultdict(list)
    for row in rows:
        by_number[row.number].append(row)
    for number in sorted(by_number):
        if not 1 <= number <= job.attempts:
            problems.append("history row for attempt %d, but jobs.attempts is %d" % (number, job.attempts))
        own = [row for row in by_number[number] if row.outcome != "lost"]
        if len(own) > 1:
            problems.append("attempt %d recorded %d times (%s)" % (number, len(own), ", ".join(r.outcome for r in own)))

    def settle(gap: list[int], gap_calls: list[Call]) -> None:
        recorded = [number for number in gap if by_number.get(number)]
        tally["cut-off calls"] += min(len(gap_calls), len(gap))
        for index, call in enumerate(gap_calls):
            if index >= len(gap):
                tally["unexplained"] += 1
                problems.append("generator call at %s (answered %s) that no attempt explains"
                                % (_clock(call.start), call.status if call.status is not None else "nothing"))
            elif index >= len(recorded):
                if job.status == "processing" and gap and gap[-1] == job.attempts and index == len(gap_calls) - 1:
                    continue  # the attempt running now: it writes its row when it ends
                problems.append("generator call at %s belongs to an attempt that left no history row"
                                % _clock(call.start))

    position, gap = 0, []
    for number in range(1, max([job.attempts, *by_number]) + 1):
        answered = [row for row in by_number.get(number, []) if row.answered]
        if not answered:
            gap.append(number)
            tally["cut-off"] += 1
            continue
        row = answered[0]
        tally["answered attempts"] += 1
        before = position
        while position < len(calls) and calls[position].start < row.start - ANSWER_TOLERANCE:
            position += 1
        settle(gap, calls[before:position])
        gap = []
        if position < len(calls) and calls[position].start <= row.end + ANSWER_TOLERANCE:
            tally["answered"] += 1
            position += 1
        else:
            problems.append("attempt %d recorded %s%s at %s–%s, but the generator saw no call then"
                            % (number, row.outcome, " (%s)" % row.error_code if row.error_code else "",
                               _clock(row.start), _clock(row.end)))
    settle(gap, calls[position:])
    return problems


def attempts_never_overlap(data: Dataset, limits: Limits) -> Verdict:
    verdict = Verdict("attempts-never-overlap", "no two recorded attempts of a job overlap in time "
                                                "(own rows; a lost row marks a recovery, not a call)")
    pairs = 0
    for job in data.jobs.values():
        rows = data.attempts.get(job.id, [])
        lost_numbers = {row.number: row for row in rows if row.outcome == "lost"}
        own = sorted((row for row in rows if row.outcome != "lost"), key=lambda row: row.start)
        pairs += max(0, len(own) - 1)
        latest = None
        for row in own:
            if latest is not None and row.start < latest.end:
                note = ""
                for late in (latest, row):
                    if late.number in lost_numbers:
                        note = ("; attempt %d was also recorded lost (its worker stopped renewing the lease), "
                                "and recorded itself when it ended" % late.number)
                verdict.violations.append("%s: attempt %d (%s, %s–%s) and attempt %d (%s, %s–%s) overlap%s"
                                          % (job.label(), latest.number, latest.outcome, _clock(latest.start),
                                             _clock(latest.end), row.number, row.outcome, _clock(row.start),
                                             _clock(row.end), note))
            if latest is None or row.end > latest.end:
                latest = row
    verdict.figure = "%d consecutive pairs of recorded attempts compared" % pairs
    return verdict


def _ledger_by_job(data: Dataset) -> dict[str, Counter]:
    entries: dict[str, Counter] = defaultdict(Counter)
    for entry in data.ledger:
        if entry.job_id:
            entries[entry.job_id][entry.entry_type] += 1
    return entries


def one_capture_per_succeeded_job(data: Dataset, limits: Limits) -> Verdict:
    verdict = Verdict("one-capture-per-succeeded-job", "a succeeded job has exactly one capture; no other job has one")
    entries = _ledger_by_job(data)
    succeeded = 0
    for job in data.jobs.values():
        captures = entries.get(job.id, Counter())["capture"]
        if job.outcome == "succeeded":
            succeeded += 1
            if captures != 1:
                verdict.violations.append("%s succeeded with %d captures" % (job.label(), captures))
        elif captures:
            verdict.violations.append("%s is %s%s yet has %d capture(s)" % (
                job.label(), job.status, "/" + job.outcome if job.outcome else "", captures))
    total = sum(1 for entry in data.ledger if entry.entry_type == "capture")
    verdict.figure = "%d captures for %d succeeded jobs" % (total, succeeded)
    return verdict


def one_release_per_other_terminal_job(data: Dataset, limits: Limits) -> Verdict:
    verdict = Verdict("one-release-per-other-terminal-job",
                      "a failed, blocked or canceled job has exactly one release; no other job has one")
    entries = _ledger_by_job(data)
    others = 0
    for job in data.jobs.values():
        releases = entries.get(job.id, Counter())["release"]
        if job.status in TERMINAL and job.outcome != "succeeded":
            others += 1
            if releases != 1:
                verdict.violations.append("%s is %s%s with %d releases" % (
                    job.label(), job.status, "/" + job.outcome if job.outcome else "", releases))
        elif releases:
            verdict.violations.append("%s is %s yet has %d release(s)" % (job.label(), job.status, releases))
    total = sum(1 for entry in data.ledger if entry.entry_type == "release")
    verdict.figure = "%d releases for %d failed, blocked and canceled jobs" % (total, others)
    return verdict


ResultProbe = Callable[[JobRow], Optional[str]]


def results_readable(data: Dataset, limits: Limits, probe: Optional[ResultProbe]) -> Verdict:
    verdict = Verdict("results-readable", "every succeeded job's result is served: 200 image/png, a whole PNG")
    if probe is None:
        verdict.checked, verdict.figure = False, "neither --web-url with --admin-token nor --media-root given"
        return verdict
    succeeded = [job for job in data.jobs.values() if job.outcome == "succeeded"]
    with ThreadPoolExecutor(4) as pool:
        problems = list(pool.map(probe, succeeded))
    for job, problem in zip(succeeded, problems):
        if problem:
            verdict.violations.append("%s: %s" % (job.label(), problem))
    verdict.figure = "%d/%d results of succeeded jobs readable" % (problems.count(None), len(succeeded))
    return verdict


def _png_problem(body: bytes) -> Optional[str]:
    from PIL import Image

    if not body.startswith(b"\x89PNG\r\n\x1a\n"):
        return "the body is not a PNG (%d bytes starting %r)" % (len(body), body[:16])
    try:
        Image.open(io.BytesIO(body)).load()
    except Exception as error:  # Pillow raises several types for a broken file
        return "the PNG does not decode (%s, %d bytes)" % (error, len(body))
    return None


def http_result_probe(web_url: str, admin_token: str) -> ResultProbe:
    import requests

    session = requests.Session()

    def probe(job: JobRow) -> Optional[str]:
        try:
            response = session.get("%s/api/jobs/%s/result" % (web_url, job.id), timeout=30,
                                   headers={"Authorization": "Bearer " + admin_token})
        except requests.RequestException as error:
            return "GET result failed: %s" % error
        if response.status_code != 200:
            return "GET result answered %d %s" % (response.status_code, response.text[:120])
        if response.headers.get("Content-Type", "").split(";")[0] != "image/png":
            return "GET result answered Content-Type %s" % response.headers.get("Content-Type")
        return _png_problem(response.content)

    return probe


def file_result_probe(media_root: Path) -> ResultProbe:
    def probe(job: JobRow) -> Optional[str]:
        if not job.result_path:
            return "no result_path"
        try:
            return _png_problem((media_root / job.result_path).read_bytes())
        except OSError as error:
            return "result file unreadable: %s" % error

    return probe


def balance_is_topups_minus_captures(data: Dataset, limits: Limits) -> Verdict:
    verdict = Verdict("balance-is-topups-minus-captures", "every user's balance = top-ups - captures")
    sums: dict[int, Counter] = defaultdict(Counter)
    for entry in data.ledger:
        sums[entry.user_id][entry.entry_type] += entry.amount
    for user in data.users.values():
        expected = sums[user.id]["topup"] - sums[user.id]["capture"]
        if user.balance != expected:
            verdict.violations.append("user %d: balance %d, but top-ups %d - captures %d = %d"
                                      % (user.id, user.balance, sums[user.id]["topup"], sums[user.id]["capture"],
                                         expected))
    verdict.figure = "%d users: balances %d = top-ups %d - captures %d" % (
        len(data.users), sum(user.balance for user in data.users.values()),
        sum(counter["topup"] for counter in sums.values()), sum(counter["capture"] for counter in sums.values()))
    return verdict


def held_is_open_holds(data: Dataset, limits: Limits) -> Verdict:
    verdict = Verdict("held-is-open-holds", "every user's held credits = the holds not yet captured or released")
    settled = {entry.job_id for entry in data.ledger if entry.entry_type in ("capture", "release")}
    open_holds: Counter = Counter()
    for entry in data.ledger:
        if entry.entry_type == "hold" and entry.job_id not in settled:
            open_holds[entry.user_id] += entry.amount
    for user in data.users.values():
        if user.held != open_holds[user.id]:
            verdict.violations.append("user %d: held %d, open holds %d" % (user.id, user.held, open_holds[user.id]))
    verdict.figure = "%d credits held, %d in open holds" % (sum(user.held for user in data.users.values()),
                                                             sum(open_holds.values()))
    return verdict


def expected_event(job: JobRow, limits: Limits) -> Optional[str]:
    if job.outcome in ("succeeded", "blocked"):
        return job.outcome
    if job.status == "failed" and limits.notify_on_failure:
        return "failed"
    return None


def notifications_match_outcomes(data: Dataset, limits: Limits) -> Verdict:
    verdict = Verdict("notifications-match-outcomes", "one notification per succeeded or blocked job%s, none for "
                                                      "any other" % (" and failed job" if limits.notify_on_failure
                                                                     else ""))
    by_job: dict[str, list[NotificationRow]] = defaultdict(list)
    for notification in data.notifications:
        by_job[notification.job_id].append(notification)
    told = Counter()
    for job in data.jobs.values():
        event = expected_event(job, limits)
        told[event] += 1
        events = sorted(notification.event for notification in by_job.pop(job.id, []))
        if events != ([event] if event else []):
            verdict.violations.append("%s is %s%s: expected %s, notified %s" % (
                job.label(), job.status, "/" + job.outcome if job.outcome else "", event or "no notification",
                events or "nothing"))
    for job_id, notifications in by_job.items():
        verdict.violations.append("notification(s) %s for job %s, which the database does not have"
                                  % ([n.event for n in notifications], job_id))
    verdict.figure = "%d notifications for %d succeeded + %d blocked%s jobs" % (
        len(data.notifications), told["succeeded"], told["blocked"],
        " + %d failed" % told["failed"] if limits.notify_on_failure else "")
    return verdict


def _accepted_by_receiver(data: Dataset) -> dict[str, list[Delivery]]:
    """Deliveries a receiver accepted: it sent a whole 2xx status line and headers (what counts
    as delivered), whatever became of the body."""
    accepted: dict[str, list[Delivery]] = defaultdict(list)
    for delivery in data.deliveries or []:
        if delivery.answered and 200 <= delivery.status < 300:
            accepted[delivery.webhook_id].append(delivery)
    return accepted


def webhooks_delivered(data: Dataset, limits: Limits) -> Verdict:
    verdict = Verdict("webhooks-delivered", "each notification to a receiver that accepts (%s) is delivered, and "
                                            "none is marked delivered that no receiver accepted"
                      % ", ".join(sorted(ACCEPTING_MODES)))
    if data.deliveries is None:
        verdict.checked, verdict.figure = False, "no receivers log"
        return verdict
    accepted = _accepted_by_receiver(data)
    by_mode: dict[str, Counter] = defaultdict(Counter)
    for notification in data.notifications:
        user = data.users.get(notification.user_id)
        mode = mode_of(user.webhook_url if user else None)
        if mode is None:
            continue
        counts = by_mode[mode]
        counts["notifications"] += 1
        received = bool(accepted.get(notification.webhook_id))
        counts["delivered"] += notification.delivered is not None
        label = "webhook %s (job %s, %s receiver of user %d, %d delivery attempts)" % (
            notification.webhook_id, notification.job_id, mode, notification.user_id, notification.delivery_attempts)
        if notification.delivered is not None and not received:
            verdict.violations.append("%s is marked delivered, but the receiver never accepted it" % label)
        elif mode in ACCEPTING_MODES and notification.delivered is None:
            verdict.violations.append("%s was never delivered%s" % (
                label, " (the receiver did accept it)" if received else ""))
    verdict.figure = "; ".join("%s: %d/%d delivered" % (mode, counts["delivered"], counts["notifications"])
                               for mode, counts in sorted(by_mode.items())) or "no webhooks"
    return verdict


def _deliveries_by_webhook(data: Dataset) -> dict[str, list[Delivery]]:
    """Each webhook-id's deliveries in order, a redirect merged with the request it led to (one
    delivery: the sender may start following it before the receiver has logged the 307)."""
    grouped: dict[str, list[Delivery]] = defaultdict(list)
    for delivery in sorted(data.deliveries or [], key=lambda d: d.start):
        deliveries = grouped[delivery.webhook_id]
        if delivery.mode == REDIRECT_TARGET:
            for index in range(len(deliveries) - 1, -1, -1):
                if 300 <= deliveries[index].status < 400:
                    deliveries[index] = replace(deliveries[index], end=max(deliveries[index].end, delivery.end),
                                                status=delivery.status, answered=delivery.answered,
                                                completed=delivery.completed)
                    break
            else:
                deliveries.append(delivery)
        else:
            deliveries.append(delivery)
    return grouped


def deliveries_never_overlap(data: Dataset, limits: Limits) -> Verdict:
    verdict = Verdict("deliveries-never-overlap", "no two deliveries of one webhook-id are in flight at once")
    if data.deliveries is None:
        verdict.checked, verdict.figure = False, "no receivers log"
        return verdict
    grouped = _deliveries_by_webhook(data)
    for webhook_id, deliveries in grouped.items():
        latest: Optional[Delivery] = None
        for delivery in deliveries:
            if latest is not None and delivery.start < latest.end:
                verdict.violations.append("webhook %s (%s receiver): delivery %s–%s (%d) and delivery %s–%s (%d) overlap"
                                          % (webhook_id, delivery.mode, _clock(latest.start), _clock(latest.end),
                                             latest.status, _clock(delivery.start), _clock(delivery.end),
                                             delivery.status))
            if latest is None or delivery.end > latest.end:
                latest = delivery
    verdict.figure = "%d deliveries of %d webhook-ids" % (sum(map(len, grouped.values())), len(grouped))
    return verdict


def webhooks_signed(data: Dataset, limits: Limits) -> Verdict:
    verdict = Verdict("webhooks-signed", "every delivery carries a valid Standard Webhooks signature")
    if data.deliveries is None:
        verdict.checked, verdict.figure = False, "no receivers log"
        return verdict
    for delivery in data.deliveries:
        if not delivery.signature_ok:
            verdict.violations.append("webhook %s delivered at %s to %s without a valid signature"
                                      % (delivery.webhook_id, _clock(delivery.start), delivery.path))
    verdict.figure = "%d deliveries, %d with a valid signature" % (
        len(data.deliveries), sum(1 for delivery in data.deliveries if delivery.signature_ok))
    return verdict


def accepted_jobs_kept(data: Dataset, limits: Limits) -> Verdict:
    verdict = Verdict("accepted-jobs-kept", "every job the API accepted is in the database")
    if data.accepted is None:
        verdict.checked, verdict.figure = False, "no submissions log"
        return verdict
    for job_id in data.accepted:
        if job_id not in data.jobs:
            verdict.violations.append("job %s was accepted but is not in the database" % job_id)
    verdict.figure = "%d accepted, %d jobs in the database" % (len(set(data.accepted)), len(data.jobs))
    return verdict


def check(data: Dataset, limits: Limits, probe: Optional[ResultProbe] = None) -> list[Verdict]:
    return [
        terminal_in_time(data, limits),
        calls_at_most(data, limits),
        calls_match_attempts(data, limits),
        attempts_never_overlap(data, limits),
        one_capture_per_succeeded_job(data, limits),
        one_release_per_other_terminal_job(data, limits),
        results_readable(data, limits, probe),
        balance_is_topups_minus_captures(data, limits),
        held_is_open_holds(data, limits),
        notifications_match_outcomes(data, limits),
        webhooks_delivered(data, limits),
        deliveries_never_overlap(data, limits),
        webhooks_signed(data, limits),
        accepted_jobs_kept(data, limits),
    ]


def report(verdicts: list[Verdict], shown: int = 20, out=sys.stdout) -> int:
    """Print each invariant, its figure and its violations (the first `shown` of them, 0 = all);
    returns the number of invariants violated."""
    for verdict in verdicts:
        mark = "SKIP" if not verdict.checked else ("ok  " if verdict.ok else "FAIL")
        print("%s %-36s %s" % (mark, verdict.name, verdict.figure), file=out)
        if verdict.violations:
            print("     %d violation(s) of: %s" % (len(verdict.violations), verdict.rule), file=out)
            for violation in verdict.violations[:shown or None]:
                print("       - " + violation, file=out)
            if shown and len(verdict.violations) > shown:
                print("       ... and %d more" % (len(verdict.violations) - shown), file=out)
    return sum(1 for verdict in verdicts if not verdict.ok)


def connect(database_url: str):
    import psycopg
    from sqlalchemy.engine import make_url

    dsn = make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)
    return psycopg.connect(dsn, autocommit=True)


def run_checks(database_url: str, limits: Limits, call_log: Optional[Path] = None,
               receivers_log: Optional[Path] = None, submissions_log: Optional[Path] = None,
               probe: Optional[ResultProbe] = None) -> list[Verdict]:
    with connect(database_url) as connection:
        data = load_database(connection)
    data.calls = read_call_log(call_log) if call_log else None
    data.deliveries = read_receivers_log(receivers_log) if receivers_log else None
    data.accepted = read_submissions_log(submissions_log) if submissions_log else None
    return check(data, limits, probe)


# ---------------------------------------------------------------------------------------------
# --self-test: a consistent run, then one break per invariant
# ---------------------------------------------------------------------------------------------

SELF_TEST_ENV = {"RETRY_DELAYS": "1,2,3,4,5", "MAX_RETRIES": "5", "MAX_RETRY_ATTEMPTS": "3",
                 "JOB_LEASE_SECONDS": "5", "QUEUE_CHECK_INTERVAL": "1", "BACKGROUND_PROCESSING_INTERVAL": "2000",
                 "MAX_BACKGROUND_RETRY_AGE": "60000", "NOTIFY_ON_FAILURE": "false"}


class SyntheticRun:
    """A small run written straight into an empty renderq database, consistent in every way the
    invariants check: users behind each kind of receiver, jobs that succeed (at once, after
    transient failures, after a lost attempt, after an unreachable generator), are blocked,
    fail (bad input, nine calls), are canceled (waiting, mid-attempt); with their attempts,
    calls, ledger, notifications, deliveries and result files."""

    def __init__(self, connection, media_root: Path, now: float):
        self.db = connection
        self.media_root = media_root
        self.now = now
        self.calls: list[Call] = []
        self.deliveries: list[Delivery] = []
        self.accepted: list[str] = []
        self.users: dict[str, int] = {}
        self.jobs: dict[str, str] = {}
        self.webhooks: dict[str, str] = {}

    def ts(self, epoch: float) -> datetime:
        return datetime.fromtimestamp(epoch, timezone.utc)

    def user(self, name: str, mode: Optional[str]) -> int:
        url = "http://127.0.0.1:9/hooks/%s/%s" % (mode, name) if mode else None
        (user_id,), = self.db.execute(
            "INSERT INTO users (email, token_hash, is_admin, balance, held, webhook_url)"
            " VALUES (%s, %s, false, 100, 0, %s) RETURNING id",
            ("%s@self-test.example" % name, uuid.uuid4().hex + uuid.uuid4().hex, url)).fetchall()
        self.db.execute("INSERT INTO ledger_entries (user_id, job_id, entry_type, amount) VALUES (%s, NULL, 'topup', 100)",
                        (user_id,))
        self.users[name] = user_id
        return user_id

    def job(self, name: str, user: str, created: float, attempts: list[tuple], status: str,
            outcome: Optional[str] = None, retry_count: int = 0, prompt: str = "") -> str:
        """`attempts`: (outcome, error_code, calls the generator, own row?, lost row?) per claim, one
        second apart; the job ends a second after the last."""
        job_id = str(uuid.uuid4())
        user_id = self.users[user]
        clock, rows = created + 1, []
        for number, (attempt_outcome, code, called, own_row, lost_row) in enumerate(attempts, start=1):
            if called:
                self.calls.append(Call(uuid.uuid4().hex, job_id, clock + 0.05, clock + 0.25,
                                       _status_for(attempt_outcome, code), None))
            if own_row:
                rows.append((number, attempt_outcome, code, clock, 0.3))
            if lost_row:
                rows.append((number, "lost", "WORKER_LOST", clock + 6, 0))
                clock += 6
            clock += 1.5
        completed = clock if status in TERMINAL else None
        result_path = None
        if outcome == "succeeded":
            result_path = "results/%s.png" % job_id
            (self.media_root / "results").mkdir(parents=True, exist_ok=True)
            (self.media_root / result_path).write_bytes(_png())
        self.db.execute(
            "INSERT INTO jobs (id, user_id, kind, params, price, status, outcome, attempts, retry_count,"
            " created_at, started_at, completed_at, updated_at, result_path, error_code)"
            " VALUES (%s, %s, 'photo.render', %s, 1, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (job_id, user_id, json.dumps({"style": "sepia", "prompt": prompt}), status, outcome, len(attempts),
             retry_count, self.ts(created), self.ts(created + 1) if attempts else None,
             self.ts(completed) if completed else None, self.ts(completed or created), result_path,
             None if outcome else (attempts[-1][1] if attempts else None)))
        for row in rows:
            self._attempt(job_id, *row)
        self.db.execute("INSERT INTO ledger_entries (user_id, job_id, entry_type, amount) VALUES (%s, %s, 'hold', 1)",
                        (user_id, job_id))
        if status in TERMINAL:
            settled = "capture" if outcome == "succeeded" else "release"
            self.db.execute("INSERT INTO ledger_entries (user_id, job_id, entry_type, amount) VALUES (%s, %s, %s, 1)",
                            (user_id, job_id, settled))
            if settled == "capture":
                self.db.execute("UPDATE users SET balance = balance - 1 WHERE id = %s", (user_id,))
        else:
            self.db.execute("UPDATE users SET held = held + 1 WHERE id = %s", (user_id,))
        self.jobs[name] = job_id
        self.accepted.append(job_id)
        if outcome in ("succeeded", "blocked"):
            self._notify(name, job_id, user_id, outcome, completed)
        return job_id

    def _attempt(self, job_id: str, number: int, outcome: str, code: Optional[str], start: float,
                 duration: float) -> None:
        self.db.execute("INSERT INTO job_attempts (job_id, number, tier, kind, outcome, error_code, started_at,"
                        " duration_ms) VALUES (%s, %s, 'fast', 'photo.render', %s, %s, %s, %s)",
                        (job_id, number, outcome, code, self.ts(start), int(duration * 1000)))

    # What each receiver answers to a sender that never follows a redirect and gives up on an
    # answer after 10 s: (status, headers sent, whole answer sent, seconds) per delivery attempt.
    ANSWERS = {
        "ok": [(200, True, True, 0.05)],
        "flaky": [(500, True, True, 0.05)] * 2 + [(200, True, True, 0.05)],
        "fail": [(500, True, True, 0.05)] * 8,
        "slowbody": [(200, True, False, 0.5)],
        "trickle": [(200, False, False, 10.0)] * 8,
        "redirect": [(307, True, True, 0.05)] * 8,
    }

    def _notify(self, name: str, job_id: str, user_id: int, event: str, completed: float) -> None:
        webhook_id = "msg_" + uuid.uuid4().hex
        (url,), = self.db.execute("SELECT webhook_url FROM users WHERE id = %s", (user_id,)).fetchall()
        mode = mode_of(url)
        answers = self.ANSWERS.get(mode, [])
        clock, delivered = completed + 0.1, None
        for status, answered, whole, length in answers:
            self.deliveries.append(Delivery(webhook_id, mode, "/hooks/%s/x" % mode, clock, clock + length,
                                            status, answered, whole, True))
            if status == 200 and answered:
                delivered = clock + 0.05
            clock += length + 1.0
        self.db.execute("INSERT INTO notifications (user_id, job_id, event, payload, webhook_id, delivered_at,"
                        " delivery_attempts, next_delivery_at) VALUES (%s, %s, %s, '{}', %s, %s, %s, NULL)",
                        (user_id, job_id, event, webhook_id, self.ts(delivered) if delivered else None, len(answers)))
        self.webhooks[name] = webhook_id

    def build(self) -> None:
        for name, mode in (("ok", "ok"), ("flaky", "flaky"), ("redirect", "redirect"), ("fail", "fail"),
                           ("trickle", "trickle"), ("slowbody", "slowbody"), ("quiet", None)):
            self.user(name, mode)
        start = self.now - 400
        ok, busy, rate_limited = ("succeeded", None, True, True, False), ("transient", "GENERATOR_BUSY", True, True, False), \
            ("transient", "RATE_LIMITED", True, True, False)
        self.job("first-try", "ok", start, [ok], "completed", "succeeded")
        self.job("after-transients", "flaky", start + 10, [busy, rate_limited, ok], "completed", "succeeded",
                 prompt="[fail:2]")
        self.job("after-lost", "redirect", start + 20, [("lost", None, True, False, True), ok], "completed", "succeeded")
        self.job("after-unreachable", "quiet", start + 30, [("transient", "GENERATOR_UNREACHABLE", False, True, False),
                                                            ok], "completed", "succeeded")
        self.job("recorded-then-lost", "quiet", start + 40, [("transient", "GENERATOR_BUSY", True, True, True), ok],
                 "completed", "succeeded")
        self.job("blocked", "ok", start + 50, [("blocked", "CONTENT_SAFETY_VIOLATION", True, True, False)],
                 "completed", "blocked", prompt="[block:CONTENT_SAFETY_VIOLATION]")
        self.job("invalid", "ok", start + 60, [("failed", "INVALID_INPUT", True, True, False)], "failed",
                 prompt="[invalid]")
        self.job("nine-calls", "quiet", start + 70, [busy] * 9, "failed", retry_count=3, prompt="[fail:10]")
        self.job("canceled-waiting", "ok", start + 100, [], "canceled")
        self.job("canceled-mid-attempt", "flaky", start + 110, [busy], "canceled")
        self.job("to-trickle", "trickle", start + 120, [ok], "completed", "succeeded")
        self.job("to-fail", "fail", start + 130, [ok], "completed", "succeeded")
        self.job("to-slow-body", "slowbody", start + 140, [ok], "completed", "succeeded")


def _status_for(outcome: str, code: Optional[str]) -> int:
    return {"succeeded": 200, "blocked": 422, "failed": 400}.get(outcome, 429 if code == "RATE_LIMITED" else 503)


def _png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 6), "teal").save(buffer, "PNG")
    return buffer.getvalue()


@dataclass
class Break:
    """One way to break the consistent run, and the one invariant that must then report it."""
    description: str
    invariant: str
    sql: list[tuple[str, tuple]] = field(default_factory=list)
    edit: Optional[Callable[[Dataset], None]] = None
    files: Optional[Callable[[Path], None]] = None


def self_test_breaks(run: SyntheticRun, limits: Limits) -> list[Break]:
    jobs, users = run.jobs, run.users
    first_try_call = next(call for call in run.calls if call.job_id == jobs["first-try"])

    def add_call(data: Dataset) -> None:
        data.calls.append(replace(first_try_call, call_id="extra", start=first_try_call.start + 5))

    def drop_call(data: Dataset) -> None:
        data.calls[:] = [call for call in data.calls if call.job_id != jobs["blocked"]]

    def tenth_call(data: Dataset) -> None:
        last = max((call for call in data.calls if call.job_id == jobs["nine-calls"]), key=lambda call: call.start)
        data.calls.append(replace(last, call_id="tenth", start=last.start + 1.5, end=last.end + 1.5))

    def drop_delivery(data: Dataset) -> None:
        data.deliveries[:] = [d for d in data.deliveries if d.webhook_id != run.webhooks["first-try"]]

    def overlapping_delivery(data: Dataset) -> None:
        first = next(d for d in data.deliveries if d.webhook_id == run.webhooks["to-trickle"])
        data.deliveries.append(replace(first, start=first.start + 7, end=first.end + 7))

    def unsigned_delivery(data: Dataset) -> None:
        index = next(i for i, d in enumerate(data.deliveries) if d.webhook_id == run.webhooks["after-transients"])
        data.deliveries[index] = replace(data.deliveries[index], signature_ok=False)

    def missing_job(data: Dataset) -> None:
        data.accepted.append(str(uuid.uuid4()))

    def corrupt_result(media_root: Path) -> None:
        (media_root / ("results/%s.png" % jobs["first-try"])).write_bytes(b"<html>502 Bad Gateway</html>")

    nine = jobs["nine-calls"]
    stuck = str(uuid.uuid4())
    return [
        Break("a job stuck in pending for ten minutes", "terminal-in-time", [
            ("INSERT INTO jobs (id, user_id, kind, params, price, status, attempts, retry_count, created_at, updated_at)"
             " VALUES (%s, %s, 'photo.render', '{}', 1, 'pending', 0, 0, now() - interval '10 minutes', now())",
             (stuck, users["quiet"])),
            ("INSERT INTO ledger_entries (user_id, job_id, entry_type, amount) VALUES (%s, %s, 'hold', 1)",
             (users["quiet"], stuck)),
            ("UPDATE users SET held = held + 1 WHERE id = %s", (users["quiet"],))]),
        Break("a canceled job that took half an hour to end", "terminal-in-time", [
            ("UPDATE jobs SET created_at = completed_at - interval '30 minutes' WHERE id = %s",
             (jobs["canceled-waiting"],))]),
        Break("a 10th generator call (and a 10th attempt)", "calls-at-most-%d" % limits.max_calls, [
            ("UPDATE jobs SET attempts = 10 WHERE id = %s", (nine,)),
            ("INSERT INTO job_attempts (job_id, number, tier, kind, outcome, error_code, started_at, duration_ms)"
             " SELECT job_id, 10, tier, kind, outcome, error_code, started_at + interval '1.5 seconds', duration_ms"
             " FROM job_attempts WHERE job_id = %s AND number = 9", (nine,))], edit=tenth_call),
        Break("a generator call no attempt explains", "calls-match-attempts", edit=add_call),
        Break("an attempt that recorded an answer the generator never gave", "calls-match-attempts", edit=drop_call),
        Break("two attempts of one job overlapping", "attempts-never-overlap", [
            ("UPDATE job_attempts SET started_at = started_at - interval '1.3 seconds', duration_ms = duration_ms + 1300"
             " WHERE job_id = %s AND number = 2", (jobs["after-transients"],))]),
        Break("a second capture of a succeeded job", "one-capture-per-succeeded-job", [
            ("DROP INDEX uq_ledger_job_entry", ()),
            ("INSERT INTO ledger_entries (user_id, job_id, entry_type, amount) VALUES (%s, %s, 'capture', 1)",
             (users["ok"], jobs["first-try"])),
            ("UPDATE users SET balance = balance - 1 WHERE id = %s", (users["ok"],))]),
        Break("a failed job whose hold was never released", "one-release-per-other-terminal-job", [
            ("DELETE FROM ledger_entries WHERE job_id = %s AND entry_type = 'release'", (jobs["invalid"],)),
            ("UPDATE users SET held = held + 1 WHERE id = %s", (users["ok"],))]),
        Break("a succeeded job whose result is an HTML page", "results-readable", files=corrupt_result),
        Break("a balance off by one", "balance-is-topups-minus-captures", [
            ("UPDATE users SET balance = balance + 1 WHERE id = %s", (users["flaky"],))]),
        Break("held credits off by one", "held-is-open-holds", [
            ("UPDATE users SET held = held + 1 WHERE id = %s", (users["redirect"],))]),
        Break("a duplicate notification", "notifications-match-outcomes", [
            ("DROP INDEX uq_notification_job_event", ()),
            ("INSERT INTO notifications (user_id, job_id, event, payload, webhook_id, delivery_attempts)"
             " VALUES (%s, %s, 'succeeded', '{}', 'msg_duplicate', 0)", (users["quiet"], jobs["after-unreachable"]))]),
        Break("a notification to an accepting receiver never delivered", "webhooks-delivered", [
            ("UPDATE notifications SET delivered_at = NULL, next_delivery_at = NULL WHERE webhook_id = %s",
             (run.webhooks["first-try"],))], edit=drop_delivery),
        Break("two deliveries of one webhook-id at once", "deliveries-never-overlap", edit=overlapping_delivery),
        Break("a delivery without a valid signature", "webhooks-signed", edit=unsigned_delivery),
        Break("an accepted job missing from the database", "accepted-jobs-kept", edit=missing_job),
    ]


class _Rollback(Exception):
    pass


def self_test(base_url: str, shown: int = 5) -> int:
    """Build the consistent run in a database of its own, check it is clean, then apply each
    break on top of it (in a transaction rolled back afterwards) and check that exactly the
    invariant it targets reports it. Returns the number of failures."""
    import psycopg
    from sqlalchemy.engine import make_url

    name = "renderq_invariants_selftest_%s" % uuid.uuid4().hex[:8]
    admin_dsn = make_url(base_url).set(drivername="postgresql", database="postgres").render_as_string(False)
    url = make_url(base_url).set(drivername="postgresql+psycopg", database=name).render_as_string(False)
    media_root = Path(tempfile.mkdtemp(prefix="renderq-invariants-"))
    limits = Limits.from_env(SELF_TEST_ENV, slack=30)
    failures = 0
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute("CREATE DATABASE %s" % name)
    try:
        subprocess.run([sys.executable, "-m", "flask", "--app", "webapp", "db", "upgrade"], cwd=ROOT, check=True,
                       capture_output=True, env={**os.environ, "DATABASE_URL": url, "MEDIA_ROOT": str(media_root)})
        with connect(url) as connection:
            run = SyntheticRun(connection, media_root, time.time())
            with connection.transaction():
                run.build()
            probe = file_result_probe(media_root)

            def verdicts_now(edit: Optional[Callable[[Dataset], None]] = None) -> list[Verdict]:
                data = load_database(connection)
                data.calls, data.deliveries, data.accepted = list(run.calls), list(run.deliveries), list(run.accepted)
                if edit:
                    edit(data)
                return check(data, limits, probe)

            print("consistent run: %d jobs, %d generator calls, %d deliveries" % (
                len(run.jobs), len(run.calls), len(run.deliveries)))
            baseline = verdicts_now()
            if report(baseline, shown):
                print("SELF-TEST FAILED: the consistent run has violations")
                return 1 + failures
            print()
            for broken in self_test_breaks(run, limits):
                backup = None
                try:
                    with connection.transaction():
                        for sql, parameters in broken.sql:
                            connection.execute(sql, parameters)
                        if broken.files:
                            backup = Path(tempfile.mkdtemp(prefix="renderq-invariants-backup-"))
                            shutil.copytree(media_root, backup / "media")
                            broken.files(media_root)
                        verdicts = verdicts_now(broken.edit)
                        raise _Rollback
                except _Rollback:
                    pass
                finally:
                    if backup:
                        shutil.rmtree(media_root)
                        shutil.copytree(backup / "media", media_root)
                        shutil.rmtree(backup)
                reported = [verdict for verdict in verdicts if verdict.violations]
                exact = [verdict.name for verdict in reported] == [broken.invariant]
                failures += not exact
                print("%s break: %s -> expected %s; reported by %s" % (
                    "ok  " if exact else "FAIL", broken.description, broken.invariant,
                    ", ".join("%s (%d)" % (verdict.name, len(verdict.violations)) for verdict in reported) or "nothing"))
                for verdict in reported:
                    for violation in verdict.violations[:shown]:
                        print("       - " + violation)
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
            admin.execute("DROP DATABASE IF EXISTS %s" % name)
        shutil.rmtree(media_root, ignore_errors=True)
    print("\nself-test: %s" % ("every break reported by exactly its invariant" if not failures
                                else "%d break(s) not reported exactly" % failures))
    return failures


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL"),
                        help="the run's database (default DATABASE_URL); with --self-test, the server to make a "
                             "scratch database on")
    parser.add_argument("--call-log", type=Path, help="the generator's GENERATOR_CALL_LOG file")
    parser.add_argument("--receivers-log", type=Path, help="the chaos webhook receivers' log")
    parser.add_argument("--submissions-log", type=Path, help="the chaos run's submissions (accepted job ids)")
    parser.add_argument("--web-url", help="the API, to GET each succeeded job's result (with --admin-token)")
    parser.add_argument("--admin-token")
    parser.add_argument("--media-root", type=Path, help="or read the results from MEDIA_ROOT directly")
    parser.add_argument("--env-file", type=Path,
                        help="NAME=VALUE lines for the ladder's settings, over the environment (bench/chaos.py "
                             "writes one as stack.env in its work directory)")
    parser.add_argument("--slack", type=float, default=60.0, help="seconds added to every job's bound (default 60)")
    parser.add_argument("--retry-after-max", type=float, default=1.0,
                        help="the longest Retry-After a 429 may carry, in seconds (default 1)")
    parser.add_argument("--shown", type=int, default=20, help="violations printed per invariant (0 = all)")
    parser.add_argument("--self-test", action="store_true",
                        help="break a small consistent run in one way per invariant and check each is reported")
    args = parser.parse_args(argv)
    if args.self_test:
        base = args.database_url or "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
        return 1 if self_test(base) else 0
    if not args.database_url:
        parser.error("--database-url (or DATABASE_URL) is required")
    probe = None
    if args.web_url and args.admin_token:
        probe = http_result_probe(args.web_url.rstrip("/"), args.admin_token)
    elif args.media_root:
        probe = file_result_probe(args.media_root)
    env = dict(os.environ)
    if args.env_file:
        env.update(line.split("=", 1) for line in args.env_file.read_text().splitlines() if "=" in line)
    limits = Limits.from_env(env, slack=args.slack, retry_after_max=args.retry_after_max)
    verdicts = run_checks(args.database_url, limits, args.call_log, args.receivers_log, args.submissions_log, probe)
    return 1 if report(verdicts, args.shown) else 0


if __name__ == "__main__":
    sys.exit(main())
