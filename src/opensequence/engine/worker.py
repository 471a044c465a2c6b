"""The delivery worker: claim a batch of due enrollments, record, send, record, advance.

One iteration (:meth:`Worker.run_once`) is short transactions around the network:

1. **claim, decide, record** — lease due enrollments and load their sequences, steps and
   contacts (a transaction); decide and render each step, with no transaction open (the
   claims are leased to this worker); then, in a second transaction, insert one ``messages``
   row per (enrollment, step) as ``sending`` (``ON CONFLICT DO NOTHING`` + re-read: a row left
   ``sending`` by a crashed worker is reused, so the resend carries the same Message-ID).
   Steps that need no provider call (skips, template errors, cancellations) are settled there
   too. Deliverability is decided here as well: a suppressed address is skipped (one query for
   the batch's addresses), a send outside its sequence's send window waits (``outside_window``)
   and a send over a sender limit waits (``throttled``; :mod:`opensequence.engine.throttle`
   reserves slots atomically across workers, in the recording transaction). COMMIT — every
   send is on record before it leaves. If deciding or recording fails, the claims are released;
   so is the rest of a batch whose renders passed the render budget (``RENDER_BUDGET``).
2. **send** — concurrently (``concurrency`` at a time), after re-checking that the enrollment,
   its sequence and its contact are still live and that the address was not suppressed
   meanwhile (an unsubscribe or a cancel that commits while a batch is prepared still stops
   its sends).
3. **finish** — mark messages sent/failed (or schedule the retry) and advance the enrollments,
   each write guarded by the lease it was claimed under; a hard bounce also suppresses the
   address in its organization.

The only duplicate this allows is a message whose worker died between the provider accepting it
and step 3 committing: the next worker resends it with the same Message-ID.

Time comes from an injectable :class:`~opensequence.clock.Clock`; tests drive a
``ManualClock`` and call :meth:`Worker.run_once` / :meth:`Worker.drain` instead of sleeping.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import os
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession

from opensequence.clock import Clock, SystemClock, minutes_after
from opensequence.config import Settings
from opensequence.db import Database
from opensequence.db.types import new_id
from opensequence.deliverability.service import (
    blocking_reason,
    suppress_bounces,
)
from opensequence.engine import repository as repo
from opensequence.engine import throttle
from opensequence.engine.metrics import EngineMetrics
from opensequence.engine.retry import GiveUp, RetryPolicy
from opensequence.engine.slices import Slices
from opensequence.engine.window import next_opening, zone_for
from opensequence.mail.dkim import signing_transport
from opensequence.mail.errors import PermanentSendError, SendError, TransientSendError
from opensequence.mail.message import (
    Outgoing,
    build_message,
    domain_of,
    make_message_id,
)
from opensequence.mail.render import TemplateError, may_be_slow, render
from opensequence.mail.transports import Transport
from opensequence.unsubscribe import load_secret, make_token, unsubscribe_url

log = logging.getLogger(__name__)

METRICS_INTERVAL_SECONDS = 5.0
# Loops of one worker (see Worker.run). Two keep a batch's database work beside another
# batch's sends; with the render outside the claim's transaction, four left SQLite's in-process
# run slower (seven pairs of bench runs: median 0.91x of the raw loop with four, 0.96x with two)
# and made no difference on PostgreSQL (0.68x either way), while holding twice as many claims.
PIPELINES = 2
# How long sends already made wait for the database to record them (capped at a third of the
# lease).
RECORD_RETRY_SECONDS = 30.0
# Characters of rendered subjects and bodies one batch may hold (see Worker._plan). A template
# may render up to 4 MiB per contact (mail.templates); a batch of 200 such sends held ~800 MB
# until its last send, per loop. Ordinary mail (a few kB a send) never comes near it.
RENDER_BUDGET = 32 * 1024 * 1024
# Mail whose body and subject have this many characters or more gets its MIME built off the
# event loop (see Worker._off_loop): ~2 ms of quoted-printable, text extraction and header
# encoding and up, per message.
OFF_LOOP_MAIL_CHARS = 16 * 1024
# A render taking longer than this on the event loop sends the rest of its step's batch off it
# (a render costs ~40-70 us; one may take up to the CPU budget of mail.templates).
INLINE_RENDER_SECONDS = 0.005
# How old the last check of a batch's unsent rest may be when a lane starts its next send (see
# Worker._send_batch): a cancel, a contact deletion or an unsubscribe that answered stops the
# batch's sends within about this, plus a send already handed over.
RECHECK_SECONDS = 0.2
# The interpreter's switch interval once work runs off the loop (see Worker._off_loop).
OFF_LOOP_SWITCH_SECONDS = 0.001
# The longest wait of an enrollment whose step raised while it was decided (see Worker._plan):
# the retry policy's backoff, capped here, and never given up (the fault is ours, not the
# recipient's).
PLAN_RETRY_MAX_SECONDS = 3600.0


def make_worker_id() -> str:
    return f"{socket.gethostname()[:32]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass
class _Send:
    """A claimed step that needs the provider, rendered; its MIME is built by the lane that
    sends it (see :meth:`outgoing`)."""

    claimed: repo.Claimed
    message_row: uuid.UUID
    message_attempts: int
    first_attempt_at: datetime
    rendered: dict[str, Any]
    message_id: str
    date: datetime
    next_delay: float | None
    one_off: bool
    # The sequence's ``updated_at`` as the batch read it (see Worker._advance).
    sequence_version: datetime
    # Counted by a sender limit at the claim (``date``), see Worker._send.
    limited: bool = False

    def outgoing(self) -> Outgoing:
        """The wire form. Built right before the hand-over rather than while the batch is
        prepared: a batch's worth of MIME (several ms) in one go held up every connection's
        replies on the event loop, and the lanes sat idle."""
        rendered = self.rendered
        message = build_message(
            from_email=rendered["from_email"],
            sender_name=rendered["sender_name"],
            to_email=rendered["to_email"],
            subject=rendered["subject"],
            html_body=rendered["body"],
            message_id=self.message_id,
            date=self.date,
            unsubscribe_url=rendered["unsubscribe_url"],
        )
        return Outgoing(rendered["from_email"], rendered["to_email"], message)


@dataclass
class _Decision:
    status: str
    reason: str | None = None
    rendered: dict[str, Any] | None = None


@dataclass
class _Loaded:
    """What :meth:`Worker._load` read for a claimed batch."""

    secret: str
    sequences: dict[uuid.UUID, Any]
    steps: dict[uuid.UUID, Any]
    contacts: dict[uuid.UUID, Any]
    existing: dict[tuple[uuid.UUID, int], Any]


_Pending = tuple[repo.Claimed, uuid.UUID, int, datetime, _Decision, str, float | None]


@dataclass
class _Plan:
    """A claimed batch decided (:meth:`Worker._plan`), before it is recorded: the sends to
    make (``pending``: claim, send record id, attempts so far, first attempt, decision,
    Message-ID, the next step's delay) and every other change."""

    enrollment_changes: list[dict[str, Any]] = field(default_factory=list)
    message_changes: list[dict[str, Any]] = field(default_factory=list)
    new_rows: list[dict[str, Any]] = field(default_factory=list)
    started: list[tuple[uuid.UUID, uuid.UUID, int]] = field(default_factory=list)
    pending: list[_Pending] = field(default_factory=list)
    # (enrollment, sequence) of the enrollment changes that follow from the sequence's steps or
    # send window as the batch read them (see Worker._record).
    follows: list[tuple[uuid.UUID, uuid.UUID]] = field(default_factory=list)
    finished: dict[str, int] = field(default_factory=dict)
    one_off: bool = False
    # The pending sends (by enrollment) that a sender limit counted (see Worker._send).
    limited: set[uuid.UUID] = field(default_factory=set)
    # Claimed but left undecided, the batch's render budget being spent: released untouched.
    deferred: list[uuid.UUID] = field(default_factory=list)

    def _lists(self) -> tuple[list[Any], ...]:
        return (
            self.enrollment_changes,
            self.message_changes,
            self.new_rows,
            self.started,
            self.pending,
            self.follows,
        )

    def follow(self, item: repo.Claimed, change: dict[str, Any]) -> None:
        """Add an enrollment change computed from the sequence's steps or send window."""
        self.enrollment_changes.append(change)
        self.follows.append((item.id, item.sequence_id))

    def mark(self) -> tuple[int, ...]:
        """Where the plan stands, for :meth:`rewind`."""
        return tuple(len(changes) for changes in self._lists())

    def rewind(self, mark: tuple[int, ...]) -> None:
        """Forget what was added since :meth:`mark` (``finished`` is counted last, so an
        item that raised never got there)."""
        for changes, length in zip(self._lists(), mark, strict=True):
            del changes[length:]


class Worker:
    def __init__(
        self,
        db: Database,
        transport: Transport,
        settings: Settings,
        *,
        clock: Clock | None = None,
        concurrency: int = 20,
        batch_size: int | None = None,
        pipelines: int = PIPELINES,
        render_budget: int = RENDER_BUDGET,
        worker_id: str | None = None,
        registry: CollectorRegistry | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.db = db
        self.transport = signing_transport(transport, settings)
        self.settings = settings
        self.clock = clock or SystemClock()
        self.concurrency = concurrency
        self.batch_size = batch_size or concurrency * 10
        self.finish_chunk = max(5 * concurrency, 1)
        self.recheck_seconds = RECHECK_SECONDS
        self.pipelines = pipelines
        self.render_budget = render_budget
        self.id = worker_id or make_worker_id()
        self.lease = timedelta(seconds=settings.worker_lease_seconds)
        self.retry = retry or RetryPolicy(
            base_seconds=settings.retry_base_seconds,
            horizon_seconds=settings.retry_horizon_seconds,
        )
        self.metrics = EngineMetrics(registry) if registry is not None else None
        self._slots = asyncio.Semaphore(concurrency)
        # Open while every outcome handed to the database got recorded. Closed by a recording
        # that fails (the database went away) until it succeeds or gives up: a message sent
        # meanwhile could not be recorded either, and would go out again once its claim ran
        # out. Lanes wait here before each send.
        self._recording = asyncio.Event()
        self._recording.set()
        self._failing_records = 0
        self._stopping = False
        self._wake = asyncio.Event()
        self._secret: str | None = None
        self._off_loop_thread: ThreadPoolExecutor | None = None
        self._metrics_at = 0.0
        self._fallback_domain = urlsplit(settings.public_url).hostname or "localhost"

    # ---------------------------------------------------------------- lifecycle of the loop

    def stop(self) -> None:
        """Stop claiming; sends already in flight finish, unsent claims are released."""
        self._stopping = True
        self._wake.set()
        self._recording.set()  # paused lanes wake up to find the worker stopping: no send

    @property
    def stopping(self) -> bool:
        return self._stopping

    async def run(self) -> None:
        """Work until :meth:`stop`. ``pipelines`` loops overlap one batch's database work with
        another's sends; they share the send slots and the worker id (their claims are
        disjoint, so the lease guards still hold)."""
        try:
            await asyncio.gather(*(self._loop() for _ in range(self.pipelines)))
        finally:
            if self._off_loop_thread is not None:
                self._off_loop_thread.shutdown(wait=False)
                self._off_loop_thread = None

    async def _off_loop(self, work: Callable[[], Any]) -> Any:
        """Run ``work`` on the worker's own thread rather than on the event loop: rendering a
        template that may be slow, building the MIME of a long body. The loop is shared with
        every send in flight (and, in ``serve``, with the API), and a render of a looping
        template holds it for up to a second; a request needing a few turns of the loop waited
        seconds. On a thread the work takes the same CPU, but the loop gets the GIL back every
        switch interval, which the first such hand-off lowers from the interpreter's 5 ms to
        :data:`OFF_LOOP_SWITCH_SECONDS` for the whole process: `bench/serve_heavy_mail.py`,
        ``GET`` beside 100 sends of a ~600 kB looping body, p50/p99 1.8/6.0 s on the loop,
        180/341 ms on a thread, 49/65 ms with the shorter interval. One thread, not a pool:
        more threads would only take more of the loop's turns."""
        if self._off_loop_thread is None:
            if sys.getswitchinterval() > OFF_LOOP_SWITCH_SECONDS:
                sys.setswitchinterval(OFF_LOOP_SWITCH_SECONDS)
            self._off_loop_thread = ThreadPoolExecutor(1, thread_name_prefix="opensequence-mail")
        return await asyncio.get_running_loop().run_in_executor(self._off_loop_thread, work)

    async def _loop(self) -> None:
        log.debug("worker %s loop started", self.id)
        while not self._stopping:
            try:
                claimed = await self.run_once()
                if claimed == 0:
                    await self.sweep_lifecycle()
            except (DBAPIError, OSError) as exc:
                log.warning("worker iteration failed, retrying after the poll interval: %s", exc)
                claimed = 0
            except Exception:
                # A bug must not silently end delivery: log it and carry on; the batch's
                # leases expire and it is retried.
                log.exception("worker iteration crashed; continuing after the poll interval")
                claimed = 0
            await self._refresh_metrics()
            if claimed == 0 and not self._stopping:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        self._wake.wait(), timeout=self.settings.worker_poll_seconds
                    )

    async def drain(self, *, max_iterations: int = 10_000) -> int:
        """Run iterations until nothing is due at the clock's current time (tests, drills).
        Returns how many enrollments were claimed in total."""
        total = 0
        for _ in range(max_iterations):
            claimed = await self.run_once()
            if claimed == 0:
                break
            total += claimed
        await self.sweep_lifecycle()
        return total

    # ------------------------------------------------------------------------ one iteration

    async def run_once(self) -> int:
        """One claim → send → finish cycle. Returns the number of enrollments claimed."""
        if self._stopping:
            return 0
        now = self.clock.now()
        async with self.db.transaction() as session:
            claimed = await repo.claim_due(
                session, now=now, worker=self.id, lease=self.lease, limit=self.batch_size
            )
            if not claimed:
                return 0
            log.debug("worker %s claimed %d due enrollments", self.id, len(claimed))
            loaded = await self._load(session, claimed)
        try:
            plan = await self._plan(claimed, loaded, now)
            async with self.db.transaction() as session:
                pending = await self._record(session, plan, loaded, now)
        except Exception:
            # Nothing of the batch was recorded: let the claims go now rather than when their
            # leases run out, as a rolled-back claim would.
            await self._release_quietly([item.id for item in claimed])
            raise
        self._count(plan.finished)
        sends = await self._sends(pending, loaded, now, plan.limited)
        one_off = plan.one_off
        lease = _Lease(now + self.lease)
        sends = await self._recheck(sends)
        late = self.clock.now() - now > self.lease / 3
        keeper = asyncio.create_task(
            self._keep_leases([s.claimed.id for s in sends], lease, renew_now=late)
        )
        try:
            await self._send_batch(sends, lease)
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
        if one_off or any(item.one_off for item in sends):
            await self.sweep_lifecycle()
        return len(claimed)

    async def sweep_lifecycle(self) -> None:
        """Complete finished one-off sequences and stamp their steps' ``ended_at``."""
        try:
            async with self.db.transaction() as session:
                await repo.finish_one_off_sequences(session, self.clock.now())
        except DBAPIError as exc:
            log.info("lifecycle sweep deferred to the next iteration: %s", exc)

    async def _secret_key(self, session: AsyncSession) -> str:
        if self._secret is None:
            self._secret = await load_secret(session, self.settings.secret_key)
        return self._secret

    async def _load(self, session: AsyncSession, claimed: list[repo.Claimed]) -> _Loaded:
        """What deciding a claimed batch needs: its sequences, their steps, its contacts (with
        their suppressions) and the send records it already has."""
        secret = await self._secret_key(session)
        sequences = await repo.load_sequences(session, (c.sequence_id for c in claimed))
        return _Loaded(
            secret=secret,
            sequences=sequences,
            steps=await repo.load_steps(session, sequences),
            contacts=await repo.load_contacts(session, (c.contact_id for c in claimed)),
            existing=await repo.load_messages(session, claimed),
        )

    async def _plan(self, claimed: list[repo.Claimed], loaded: _Loaded, now: datetime) -> _Plan:
        """Decide and render each claimed step, outside any transaction (the claims are leased
        to this worker), pausing for the sends in flight (:mod:`opensequence.engine.slices`).
        On SQLite the write lock is then held only for the claim and for the records, not
        while a batch renders: a `POST` beside a busy worker waits less.

        Once the batch's rendered subjects and bodies pass ``render_budget`` characters, the
        rest of it is left undecided (``plan.deferred``) and released when the plan is
        recorded, for a later batch: a batch keeps what it renders until its last send, and
        templates that render megabytes per contact would otherwise hold that times the
        batch size."""
        slices = Slices()
        rendered = 0
        slow: dict[tuple[uuid.UUID, int], bool] = {}  # per step, see _renders_slowly
        steps_by_index = {
            sequence_id: {row.step_index: row for row in rows}
            for sequence_id, rows in loaded.steps.items()
        }
        plan = _Plan()
        for position, item in enumerate(claimed):
            if rendered > self.render_budget:
                plan.deferred = [left.id for left in claimed[position:]]
                log.info(
                    "batch of %d reached its render budget after %d; the rest is released",
                    len(claimed),
                    position,
                )
                break
            await slices.pause()
            mark = plan.mark()
            try:
                rendered += await self._plan_one(plan, item, loaded, steps_by_index, slow, now)
            except Exception:
                # A bug met by this enrollment's data must not hold up the batch: claimed
                # again first at every poll, the whole batch would never go out. It waits on
                # its step instead, as a retry does (never failed for our fault), and the log
                # says why.
                plan.rewind(mark)
                wait = min(self.retry.delay(item.attempts + 1), PLAN_RETRY_MAX_SECONDS)
                log.exception(
                    "deciding step %d of enrollment %s raised; it is tried again in %.0f s",
                    item.current_step,
                    item.id,
                    wait,
                )
                plan.enrollment_changes.append(_retrying(item, now + timedelta(seconds=wait)))
        return plan

    async def _plan_one(
        self,
        plan: _Plan,
        item: repo.Claimed,
        loaded: _Loaded,
        steps_by_index: dict[uuid.UUID, dict[int, Any]],
        slow: dict[tuple[uuid.UUID, int], bool],
        now: datetime,
    ) -> int:
        """Decide one claimed step into ``plan``; returns the characters it rendered."""
        sequence = loaded.sequences.get(item.sequence_id)
        contact = loaded.contacts.get(item.contact_id)
        if sequence is not None and not sequence.is_continuous:
            plan.one_off = True
        if sequence is None or sequence.status != "active" or contact is None:
            plan.enrollment_changes.append(_ended(item, "canceled"))
            return 0
        by_index = steps_by_index.get(item.sequence_id, {})
        step = by_index.get(item.current_step)
        row = loaded.existing.get((item.id, item.current_step))
        if step is None:
            if row is not None and row.status == "sending":
                # Its retry was pending when the step was removed: nothing will send it.
                plan.message_changes.append(_message_change(row.id, "skipped", "canceled"))
            plan.follow(item, _ended(item, "completed"))
            return 0
        next_step = by_index.get(item.current_step + 1)
        next_delay = None if next_step is None else float(next_step.delay_in_minutes)
        if row is not None and row.status != "sending":
            # Settled by a worker that lost its lease before it could advance.
            if row.status == "failed":
                plan.enrollment_changes.append(_ended(item, "failed"))
            else:
                plan.follow(item, _advanced(item, next_delay, now))
            return 0
        decide = functools.partial(
            self._decide, item, sequence, step, contact, loaded.secret, contact.suppression
        )
        key = (item.sequence_id, item.current_step)
        if key not in slow:
            slow[key] = _renders_slowly(step)
        if slow[key]:
            decision = await self._off_loop(decide)
        else:
            started = time.thread_time()
            decision = decide()
            # Short templates without loops may still be slow (filters over long values, up to
            # the render's CPU budget): the rest of this step's batch then renders off the loop.
            slow[key] = time.thread_time() - started > INLINE_RENDER_SECONDS
        rendered = 0
        if decision.rendered is not None:
            rendered = len(decision.rendered["subject"]) + len(decision.rendered["body"])
        if decision.status == "sending" and sequence.send_window:
            opens = _window_opens(sequence.send_window, contact.custom_data, now)
            if opens is not None:
                plan.follow(item, _waiting(item, opens, "outside_window"))
                if row is not None and row.status == "sending" and row.reason is None:
                    # A record made for a send that did not go (its batch released): it waits
                    # too, and no sender limit counts it meanwhile (see throttle._counted).
                    change = _message_change(row.id, "sending", "outside_window")
                    plan.message_changes.append(change)
                return rendered
        plan.started.append((item.id, item.sequence_id, item.current_step))
        if row is None:
            row_id = new_id()
            data = step.action.get("data") or {}
            from_email = data.get("from_email")
            domain = domain_of(from_email) if from_email else self._fallback_domain
            message_id = make_message_id(row_id, domain)
            plan.new_rows.append(
                {
                    "id": row_id,
                    "org_id": item.org_id,
                    "enrollment_id": item.id,
                    "sequence_id": item.sequence_id,
                    "contact_id": item.contact_id,
                    "step_index": item.current_step,
                    "from_email": from_email,
                    "to_email": contact.email,
                    "status": decision.status,
                    "reason": decision.reason,
                    "message_id": message_id,
                    "attempts": 0,
                    "created_at": now,
                    "updated_at": now,
                }
            )
            attempts, first_at = 0, now
        else:
            row_id, message_id = row.id, row.message_id
            attempts, first_at = row.attempts, row.created_at
            if decision.status != "sending":
                change = _message_change(row_id, decision.status, decision.reason)
                plan.message_changes.append(change)
        if decision.status == "sending":
            plan.pending.append(
                (item, row_id, attempts, first_at, decision, message_id, next_delay)
            )
            return rendered
        if decision.status == "failed":
            plan.enrollment_changes.append(_ended(item, "failed"))
        else:
            plan.follow(item, _advanced(item, next_delay, now))
        plan.finished[decision.status] = plan.finished.get(decision.status, 0) + 1  # last
        return rendered

    async def _record(
        self, session: AsyncSession, plan: _Plan, loaded: _Loaded, now: datetime
    ) -> list[_Pending]:
        """Write the plan: reserve throttle slots (the sends over a sender limit wait instead),
        insert the send records as ``sending``, settle the steps that need no provider call,
        stamp the steps that start and release the deferred claims. Returns the sends to
        make.

        First, the changes that follow from a sequence's steps or send window (a wait for the
        window, the next step's delay) are dropped if the sequence was edited since the batch
        read it: those enrollments are released, still due, and the next claim decides them
        again from the sequence as it is (:func:`repository.edited_sequences`)."""
        if plan.follows:
            read = {seq: loaded.sequences[seq].updated_at for _, seq in plan.follows}
            edited = await repo.edited_sequences(session, read)
            again = {enrollment for enrollment, seq in plan.follows if seq in edited}
            if again:
                log.info("%d steps are decided again: their sequence was edited", len(again))
                plan.enrollment_changes = [
                    change for change in plan.enrollment_changes if change["b_id"] not in again
                ]
                plan.deferred = plan.deferred + list(again)
        # Records of steps settled without a send keep the address they were decided for; a
        # contact deleted since the claim (its deletion drops its address from every record
        # there was then) leaves none on them.
        settled = [r for r in plan.new_rows if r["status"] != "sending" and r["to_email"]]
        if settled:
            present = await repo.present_contacts(session, {r["contact_id"] for r in settled})
            for row in settled:
                if row["contact_id"] not in present:
                    row["to_email"] = None
        pending = plan.pending
        admission = await throttle.admit(
            session,
            [
                throttle.Request(p[0].id, p[0].org_id, p[4].rendered["from_email"])
                for p in pending
                if p[4].rendered is not None
            ],
            now,
        )
        waits, plan.limited = admission.waits, admission.limited
        new_rows, enrollment_changes = plan.new_rows, plan.enrollment_changes
        if waits:
            enrollment_changes = enrollment_changes + [
                _waiting(p[0], waits[p[0].id], "throttled") for p in pending if p[0].id in waits
            ]
            # Reused records that did not go out (a released batch) wait too, uncounted.
            plan.message_changes = plan.message_changes + [
                _message_change(p[1], "sending", "throttled")
                for p in pending
                if p[0].id in waits
                and (reused := loaded.existing.get((p[0].id, p[0].current_step))) is not None
                and reused.reason is None
            ]
            pending = [p for p in pending if p[0].id not in waits]
            new_rows = [r for r in new_rows if r["enrollment_id"] not in waits]
        inserted = {r["id"] for r in new_rows}
        await throttle.reserve(session, (p[1] for p in pending if p[1] not in inserted), now)
        ours = await repo.insert_messages(session, new_rows)
        if new_rows:
            lost = {r["enrollment_id"] for r in new_rows if r["id"] not in ours}
            if lost:
                log.warning("%d send records were written by another worker; skipping", len(lost))
                pending = [p for p in pending if p[0].id not in lost]
                enrollment_changes = [c for c in enrollment_changes if c["b_id"] not in lost]
        not_started = {
            (row.sequence_id, row.step_index)
            for rows in loaded.steps.values()
            for row in rows
            if row.started_at is None
        }
        await repo.stamp_steps_started(
            session,
            (
                (seq, step)
                for eid, seq, step in plan.started
                if eid not in waits and (seq, step) in not_started
            ),
            now,
        )
        await repo.update_messages(session, plan.message_changes, now)
        await repo.update_enrollments(session, enrollment_changes, worker=self.id, now=now)
        await repo.release(session, plan.deferred, worker=self.id)
        # A send record left waiting for its retry whose enrollment ended while this worker
        # held it: a cancel or a contact deletion (they leave held records to their worker),
        # or this plan itself (its sequence found canceled). Only the batch's sends were
        # settled later, and it stayed ``sending`` for good. After the enrollment writes, which
        # wait for a stop holding them: its end is then seen.
        sending = {p[1] for p in pending}
        waiting = [r.id for r in loaded.existing.values() if r.status == "sending"]
        await repo.settle_abandoned(session, [i for i in waiting if i not in sending], now)
        return pending

    async def _sends(
        self, pending: list[_Pending], loaded: _Loaded, now: datetime, limited: set[uuid.UUID]
    ) -> list[_Send]:
        """The pending sends to hand over, those a sender limit counted first: they must go out
        within :data:`throttle.RESERVATION` of the claim (see :meth:`_send`)."""
        slices = Slices()
        sends: list[_Send] = []
        for item, row_id, attempts, first_at, decision, message_id, next_delay in pending:
            await slices.pause()
            assert decision.rendered is not None
            sends.append(
                _Send(
                    claimed=item,
                    message_row=row_id,
                    message_attempts=attempts,
                    first_attempt_at=first_at,
                    rendered=decision.rendered,
                    message_id=message_id,
                    date=now,
                    next_delay=next_delay,
                    one_off=not loaded.sequences[item.sequence_id].is_continuous,
                    sequence_version=loaded.sequences[item.sequence_id].updated_at,
                    limited=item.id in limited,
                )
            )
        if limited:
            sends.sort(key=lambda send: not send.limited)
        return sends

    async def _release_quietly(self, ids: list[uuid.UUID]) -> None:
        try:
            async with self.db.transaction() as session:
                await repo.release(session, ids, worker=self.id)
        except (DBAPIError, OSError) as exc:
            log.warning("releasing %d claims failed; their leases run out: %s", len(ids), exc)

    def _decide(
        self,
        item: repo.Claimed,
        sequence: Any,
        step: Any,
        contact: Any,
        secret: str,
        suppression: str | None = None,
    ) -> _Decision:
        """What this step does for this contact; renders the mail when it is to be sent.
        ``suppression`` is the reason the contact's address is on its organization's
        suppression list, if it is."""
        action = step.action or {}
        kind = action.get("type")
        if kind == "make_phone_calls":
            return _Decision("skipped", "no_call_provider")
        if kind != "send_emails":
            return _Decision("skipped", f"unsupported_action: {kind}")
        if not contact.email:
            return _Decision("skipped", "no_email")
        data = action.get("data") or {}
        from_email = data.get("from_email")
        if not from_email:
            return _Decision("failed", "template_error: no from_email")
        transactional = bool(data.get("email_is_transactional"))
        blocked = blocking_reason(suppression, transactional=transactional)
        if blocked is not None:
            return _Decision("skipped", blocked)
        url = unsubscribe_url(
            self.settings.public_url, make_token(secret, item.org_id, item.contact_id)
        )
        context = {
            "contact": {
                "id": str(contact.id),
                "email": contact.email,
                "phone_number": contact.phone_number,
                "name": contact.name,
                "custom_data": contact.custom_data or {},
            },
            "sequence": {
                "id": str(sequence.id),
                "name": sequence.name,
                "custom_id": sequence.custom_id,
            },
            "step": {"index": item.current_step},
            "unsubscribe_url": url,
        }
        try:
            subject = render(data.get("email_subject") or "", context, html=False)
            body = render(data.get("email_body") or "", context, html=True)
        except TemplateError as exc:
            log.info("template error for enrollment %s: %s", item.id, exc)
            return _Decision("failed", "template_error")
        return _Decision(
            "sending",
            rendered={
                "from_email": from_email,
                "sender_name": data.get("email_sender_name"),
                "to_email": contact.email,
                "subject": subject,
                "body": body,
                "unsubscribe_url": None if transactional else url,
                "transactional": transactional,
            },
        )

    async def _recheck(self, sends: list[_Send]) -> list[_Send]:
        """Drop sends whose enrollment, sequence or contact stopped being live since the claim
        (a cancel that committed while the batch was being prepared), skip those whose address
        got suppressed meanwhile (an unsubscribe takes effect at once, SPEC §6), and release
        those whose sequence was edited since the claim: decided again from the sequence as it
        is (a send window set meanwhile holds them), they reuse their send record."""
        if not sends:
            return sends
        # Usually everything is still live: a read, which on SQLite does not wait for the
        # writer. What changed is settled in a transaction of its own (each write is guarded
        # by the lease, whatever happened in between).
        async with self.db.reading() as session:
            live = await repo.still_live(session, (s.claimed.id for s in sends), worker=self.id)
        blocked = {
            item.claimed.id: reason
            for item in sends
            if (alive := live.get(item.claimed.id)) is not None
            and (
                reason := blocking_reason(
                    alive.suppression, transactional=item.rendered["transactional"]
                )
            )
            is not None
        }
        edited = {
            item.claimed.id
            for item in sends
            if item.claimed.id not in blocked
            and (alive := live.get(item.claimed.id)) is not None
            and alive.sequence_version != item.sequence_version
        }
        if len(live) == len(sends) and not blocked and not edited:
            return sends
        async with self.db.transaction() as session:
            now = self.clock.now()
            # Moved on past the skipped step as a send would be (the sequence held first).
            skipped = [item for item in sends if item.claimed.id in blocked]
            enrollments = await self._advance(session, skipped, now)
            state = await repo.recheck(
                session, (s.claimed.id for s in sends if s.claimed.id not in live), worker=self.id
            )
            keep = [
                i
                for i in sends
                if i.claimed.id in live
                and i.claimed.id not in blocked
                and i.claimed.id not in edited
            ]
            messages: list[dict[str, Any]] = []
            released: list[uuid.UUID] = []
            abandoned: list[uuid.UUID] = []
            for item in sends:
                suppressed = blocked.get(item.claimed.id)
                if suppressed is not None:
                    messages.append(_message_change(item.message_row, "skipped", suppressed))
                    continue
                if item.claimed.id in edited:
                    released.append(item.claimed.id)
                    continue
                found = state.get(item.claimed.id)
                if found is None:
                    continue
                if not found.mine:
                    # Lost to a cancel or a contact deletion (which ends the lease): our send
                    # record would stay ``sending`` for good. Lost to a lease expiry, the
                    # enrollment is still active and the record is the new owner's.
                    if not found.enrollment_active:
                        abandoned.append(item.message_row)
                    continue
                if found.enrollment_active and found.sequence_active and found.contact_exists:
                    keep.append(item)  # live by the second read (a later snapshot)
                    continue
                messages.append(_message_change(item.message_row, "skipped", "canceled"))
                if found.enrollment_active:
                    enrollments.append(_ended(item.claimed, "canceled"))
                else:
                    released.append(item.claimed.id)
            await repo.update_messages(session, messages, now)
            await repo.update_enrollments(session, enrollments, worker=self.id, now=now)
            await repo.release(session, released, worker=self.id)
            await repo.settle_abandoned(session, abandoned, now)
        if blocked:
            self._count({"skipped": len(blocked)})
        return keep

    async def _keep_leases(self, ids: list[uuid.UUID], lease: _Lease, *, renew_now: bool) -> None:
        """Extend this batch's leases every third of the lease while its sends run, so that a
        slow provider never lets another worker take (and resend) live claims; only a dead
        worker's leases run out. A renewal that fails leaves ``lease.until`` where it was and
        :meth:`_send` stops starting sends once it has passed. ``renew_now``: preparing the
        batch already used a third of the lease (a loaded machine), so renew before sending."""
        if not ids:
            return
        period = self.lease.total_seconds() / 3
        while True:
            if not renew_now:
                await asyncio.sleep(period)
            renew_now = False
            until = self.clock.now() + self.lease
            try:
                async with self.db.transaction() as session:
                    await repo.renew(session, ids, worker=self.id, until=until)
            except DBAPIError as exc:
                log.warning("lease renewal failed: %s", exc)
                continue
            lease.until = until

    async def _send_batch(self, sends: list[_Send], lease: _Lease) -> None:
        """Send a batch through up to ``concurrency`` lanes, recording outcomes in chunks as
        they come in.

        A lane holds one of the worker's send slots (shared by the pipelines) while its batch
        has messages left, and sends them one after another: no task or slot wait per message.
        Outcomes are recorded every ``finish_chunk`` sends rather than once per batch: a crash
        then leaves at most a chunk (plus the sends in flight) of sent-but-unrecorded messages
        to be resent, and the database work overlaps the sends still in flight. A chunk is 5x
        the concurrency: each one is a transaction, which on a loaded machine costs ~2-3 ms of
        the event loop's time whatever its size. While a chunk's recording is failing, no
        lane of any batch starts a send (``_recording``); once it works again, the rest of the
        batch is checked again (``refresh``) before the next send starts.

        The rest of the batch is also checked again once the last check is
        ``recheck_seconds`` old. Checked once before the first send, a batch went on sending for
        (batch size / concurrency) x the provider's time per message after a cancel, a contact
        deletion or an unsubscribe had answered: 2-3 s with a provider taking 0.3 s. A batch
        that goes out faster than that is not checked again."""
        if not sends:
            return
        queue = collections.deque(sends)
        done: list[tuple[_Send, SendError | None]] = []
        ready = asyncio.Event()
        # Pauses of the recording gate seen by this batch's lanes, and how many of them the
        # rest of the batch has been checked again after (see refresh); when the last check
        # (run_once's, just before) read the database.
        pauses = checked = 0
        loop = asyncio.get_running_loop()
        checked_at = loop.time()
        refreshing = asyncio.Lock()

        def stale() -> bool:
            return checked != pauses or loop.time() - checked_at >= self.recheck_seconds

        async def refresh() -> None:
            """Check what is left of the batch again: the last check may be too old, and after
            a pause an unsubscribe or a cancel may have committed while this worker could not
            record (the API reaching the database when it did not)."""
            nonlocal checked, checked_at
            async with refreshing:
                if not stale():
                    return  # another lane checked meanwhile
                seen, started = pauses, loop.time()
                try:
                    kept = await self._recheck(list(queue))
                except (DBAPIError, OSError) as exc:
                    # As when recording fails for good: nothing more is sent, the claims run
                    # out their leases and go out later.
                    log.warning("checking the rest of a batch again failed: %s", exc)
                    kept = []
                queue.clear()
                queue.extend(kept)
                checked, checked_at = seen, started

        async def lane() -> None:
            nonlocal pauses
            try:
                if not queue:
                    return
                async with self._slots:
                    while queue:
                        if not self._recording.is_set():
                            pauses += 1
                            await self._recording.wait()
                        if stale():
                            await refresh()
                            if not queue:
                                break
                        done.append(await self._send(queue.popleft(), lease))
                        if len(done) >= self.finish_chunk:
                            ready.set()
            finally:
                ready.set()

        lanes = [asyncio.create_task(lane()) for _ in range(min(self.concurrency, len(sends)))]
        try:
            while True:
                finished = all(task.done() for task in lanes)
                if len(done) >= self.finish_chunk or (finished and done):
                    chunk = done[:]
                    del done[:]
                    await self._finish(chunk)
                    continue
                if finished:
                    break
                ready.clear()
                await ready.wait()
        finally:
            # Recording failed (the database went away) or the batch was cancelled: send
            # nothing more. What is left keeps its claim, runs out its lease and goes out
            # later; sent-but-unrecorded messages are then only the failed chunk and those
            # in flight, rather than the rest of the batch too.
            queue.clear()
            outcomes = await asyncio.gather(*lanes, return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                # A lane died outside a send (a bug): its claim runs out and is retried.
                raise outcome

    async def _send(self, item: _Send, lease: _Lease) -> tuple[_Send, SendError | None]:
        if self._stopping or self.clock.now() >= lease.until:
            return item, _NotSent("not sent: worker stopping or lease expiring")
        if item.limited and self.clock.now() - item.date > throttle.RESERVATION:
            # Other workers count its reservation only so long (see throttle._in_window):
            # handed over later, it could make more sends in a window than the limit allows.
            # Released, it is claimed and reserved again.
            return item, _NotSent("not sent: its sender-limit reservation ran out")
        try:
            rendered = item.rendered
            if len(rendered["body"]) + len(rendered["subject"]) >= OFF_LOOP_MAIL_CHARS:
                outgoing = await self._off_loop(item.outgoing)
            else:
                outgoing = item.outgoing()
            await self.transport.send(outgoing)
        except SendError as exc:
            return item, exc
        except Exception as exc:  # a bug must not lose the batch's bookkeeping
            log.exception("building or handing over a message raised an unexpected error")
            return item, TransientSendError(f"{type(exc).__name__}: {exc}")
        return item, None

    async def _finish(self, results: Iterable[tuple[_Send, SendError | None]]) -> None:
        results = list(results)
        if not results:
            return
        now = self.clock.now()
        messages: list[dict[str, Any]] = []
        enrollments: list[dict[str, Any]] = []
        released: list[uuid.UUID] = []
        # Send records left ``sending`` (a retry, an unsent release): settled if a cancel or a
        # contact deletion ended their enrollment meanwhile, or they stayed ``sending`` for good.
        left_open: list[uuid.UUID] = []
        finished: dict[str, int] = {}
        bounces: list[tuple[uuid.UUID, str]] = []
        sent: list[_Send] = []
        retries = 0
        for item, error in results:
            claim = item.claimed
            if isinstance(error, _NotSent):
                released.append(claim.id)
                left_open.append(item.message_row)
                continue
            if error is None:
                messages.append(_message_change(item.message_row, "sent", None, now, attempted=1))
                sent.append(item)
                finished["sent"] = finished.get("sent", 0) + 1
                continue
            verdict = self.retry.decide(
                error,
                attempt=item.message_attempts + 1,
                first_attempt_at=item.first_attempt_at,
                now=now,
            )
            if isinstance(verdict, GiveUp):
                if isinstance(error, PermanentSendError) and error.bounce:
                    bounces.append((claim.org_id, item.rendered["to_email"]))
                messages.append(
                    _message_change(item.message_row, "failed", verdict.reason, attempted=1)
                )
                enrollments.append(_ended(claim, "failed"))
                finished["failed"] = finished.get("failed", 0) + 1
                continue
            retries += 1
            messages.append(
                _message_change(item.message_row, "sending", verdict.reason, attempted=1)
            )
            enrollments.append(_retrying(claim, verdict.at))
            left_open.append(item.message_row)
        # These messages are out: a failure to record them would make each one a duplicate
        # once its claim expires, so a database that went away (a restart, a failover) is
        # waited for, within a third of the lease.
        # Meanwhile no lane starts another send (see ``_recording``).
        deadline = time.monotonic() + min(RECORD_RETRY_SECONDS, self.lease.total_seconds() / 3)
        pause = 0.1
        failing = False

        def pause_sends() -> None:
            nonlocal failing
            if not failing:
                failing = True
                self._failing_records += 1
                self._recording.clear()

        try:
            while True:
                try:
                    async with self.db.transaction() as session:
                        try:
                            advanced = await self._advance(session, sent, now)
                            await repo.update_messages(session, messages, now)
                            await repo.update_enrollments(
                                session, enrollments + advanced, worker=self.id, now=now
                            )
                            await repo.release(session, released, worker=self.id)
                            await repo.settle_abandoned(session, left_open, now)
                            await suppress_bounces(session, bounces, now)
                        except (DBAPIError, OSError):
                            pause_sends()  # now, not after the rollback lets the lanes run
                            raise
                    break
                except (DBAPIError, OSError) as exc:
                    pause_sends()
                    if time.monotonic() + pause > deadline:
                        raise
                    log.warning("recording %d outcomes failed, retrying: %s", len(results), exc)
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, 2.0)
        finally:
            if failing:
                self._failing_records -= 1
                if self._failing_records == 0:
                    self._recording.set()
        self._count(finished)
        if self.metrics is not None and retries:
            self.metrics.retries.inc(retries)

    async def _advance(
        self, session: AsyncSession, sent: list[_Send], now: datetime
    ) -> list[dict[str, Any]]:
        """The enrollments of these sends, on to their next step with its delay as it is now.

        A steps edit moves the enrollments it sees waiting for a step; it cannot see one whose
        previous step is being sent, and that one took the delay read at its claim (a week
        where the step now says a day). The sequences are read here first (and held, see
        :func:`repository.edited_sequences`); the steps of any edited since the claim are read
        again."""
        if not sent:
            return []
        read = {item.claimed.sequence_id: item.sequence_version for item in sent}
        edited = await repo.edited_sequences(session, read)
        delays: dict[tuple[uuid.UUID, int], float] = {}
        if edited:
            for sequence_id, rows in (await repo.load_steps(session, edited)).items():
                for row in rows:
                    delays[(sequence_id, row.step_index)] = float(row.delay_in_minutes)
        changes = []
        for item in sent:
            claim, next_delay = item.claimed, item.next_delay
            if claim.sequence_id in edited:
                next_delay = delays.get((claim.sequence_id, claim.current_step + 1))
            changes.append(_advanced(claim, next_delay, now))
        return changes

    # ------------------------------------------------------------------------------ metrics

    def _count(self, finished: dict[str, int]) -> None:
        if self.metrics is not None:
            for status, count in finished.items():
                self.metrics.messages.labels(status=status).inc(count)

    async def _refresh_metrics(self) -> None:
        if self.metrics is None or time.monotonic() - self._metrics_at < METRICS_INTERVAL_SECONDS:
            return
        self._metrics_at = time.monotonic()
        now = self.clock.now()
        try:
            async with self.db.reading() as session:
                count, oldest = await repo.due_backlog(session, now)
        except DBAPIError:
            return
        self.metrics.due_backlog.set(count)
        self.metrics.oldest_due_lag.set(0 if oldest is None else (now - oldest).total_seconds())


@dataclass
class _Lease:
    until: datetime


class _NotSent(SendError):
    """A claimed send never handed to the provider (stopping, or the lease ran short)."""


def _base(item: repo.Claimed) -> dict[str, Any]:
    return {"b_id": item.id, "b_claimed_step": item.current_step}


def _advanced(item: repo.Claimed, next_delay: float | None, now: datetime) -> dict[str, Any]:
    """The enrollment after its current step: on to the next step, or completed."""
    if next_delay is None:
        return _ended(item, "completed", step=item.current_step + 1)
    return {
        **_base(item),
        "b_status": "active",
        "b_step": item.current_step + 1,
        "b_next_at": minutes_after(now, next_delay),
        "b_waiting": None,
        "b_attempts": 0,
    }


def _waiting(item: repo.Claimed, until: datetime, reason: str) -> dict[str, Any]:
    """The enrollment stays on its step, due again at ``until`` (throttled, outside_window)."""
    return {
        **_base(item),
        "b_status": "active",
        "b_step": item.current_step,
        "b_next_at": until,
        "b_waiting": reason,
        "b_attempts": item.attempts,
    }


def _retrying(item: repo.Claimed, until: datetime) -> dict[str, Any]:
    """The enrollment stays on its step after a failed attempt, due again at ``until``."""
    return {**_waiting(item, until, "retrying"), "b_attempts": item.attempts + 1}


def _renders_slowly(step: Any) -> bool:
    """Whether the step's subject or body template may be slow to render (see
    :func:`opensequence.mail.render.may_be_slow`)."""
    data = (step.action or {}).get("data") or {}
    return any(
        isinstance(source, str) and may_be_slow(source)
        for source in (data.get("email_subject"), data.get("email_body"))
    )


def _window_opens(window: dict[str, Any], custom_data: Any, now: datetime) -> datetime | None:
    """None when the sequence's send window is open now, else when it next opens (a window
    that never opens is looked at again in a day)."""
    opens = next_opening(window, zone_for(window, custom_data), now)
    if opens is None:
        return now + timedelta(days=1)
    return None if opens <= now else opens


def _ended(item: repo.Claimed, status: str, *, step: int | None = None) -> dict[str, Any]:
    return {
        **_base(item),
        "b_status": status,
        "b_step": item.current_step if step is None else step,
        "b_next_at": None,
        "b_waiting": None,
        "b_attempts": item.attempts,
    }


def _message_change(
    row_id: uuid.UUID,
    status: str,
    reason: str | None,
    sent_at: datetime | None = None,
    *,
    attempted: int = 0,
) -> dict[str, Any]:
    return {
        "b_id": row_id,
        "b_status": status,
        "b_reason": reason,
        "b_attempted": attempted,
        "b_sent_at": sent_at,
    }
