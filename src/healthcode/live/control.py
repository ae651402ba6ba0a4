"""The control layer: the one place that changes what is in force and publishes what follows from it.

Every change goes the same way, whoever asks for it (an RPC, server start-up, ``healthcode reevaluate``)::

    a new risk list / a new policy / time moves on
      -> re-evaluate the persons it may have changed (a risk-list change: only those visiting a region whose folded
         risk changed; a policy change or a re-evaluation: everyone)
      -> commit their new statuses, the change log and the new list or policy version in ONE store transaction
      -> publish: the new snapshot replaces the old one (evaluations see the old or the new, never a mix)
      -> audit: who did it, and what it changed, is kept in the store
      -> notify: listeners (the service's change-stream subscribers, metrics) hear of it

Without a store only the snapshot is replaced (nothing is published or audited).  Changes run one at a time (a
lock); they are blocking calls, so the service runs them off its event loop.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources

from healthcode import logs
from healthcode.errors import Precondition
from healthcode.live.state import Snapshot, State
from healthcode.live.statusbook import AdminRow, StatusBook, Summary
from healthcode.rules.policy import PolicyTimeline, default_policy, parse_policy
from healthcode.rules.regions import RiskList, load_risk_list, parse_risk_csv
from healthcode.store import Store

log = logging.getLogger("healthcode.admin")

#: The message of the error every store-only operation raises on a server without a store.
NO_STORE = "this server has no store: start it with --store PATH (or HEALTHCODE_STORE) to use this RPC"

EMPTY_RISK_CSV = "region,start_date,end_date,kind\n"


def initial_state(policy_path: str | os.PathLike[str] | None, risk_path: str | os.PathLike[str] | None) -> State:
    """The snapshot given on the command line or in the settings: the policy TOML (None: the shipped default) and
    the risk-list CSV (None: an empty list, with a warning)."""
    if policy_path:
        with open(policy_path, encoding="utf-8") as f:
            text = f.read()
        timeline = parse_policy(text, str(policy_path))
    else:
        text = resources.files("healthcode").joinpath("data/default_policy.toml").read_text("utf-8")
        timeline = default_policy()
    if risk_path:
        risk = load_risk_list(risk_path)
    else:
        log.warning(
            "no risk list given (--risk or HEALTHCODE_RISK): starting with an empty list; replace it with PutRiskList"
        )
        risk = parse_risk_csv(EMPTY_RISK_CSV, "empty")
    return State(risk, timeline, text)


def _ms(since: float) -> float:
    return round((time.perf_counter() - since) * 1000, 2)


@dataclass(frozen=True)
class Change:
    """What a change did: the snapshot now in force and, with a store, the re-evaluation it caused."""

    snapshot: Snapshot
    summary: Summary | None


Listener = Callable[[Change], None]


class Control:
    """Owns the snapshot in force (:class:`State`) and, with a store, the status book: the only writer of both."""

    def __init__(self, state: State, book: StatusBook | None = None) -> None:
        self.state = state
        self.book = book
        self._lock = threading.Lock()
        self._listeners: list[Listener] = []
        self._last_list: RiskList | None = None  # the list the last risk-list change installed

    # -- opening ----------------------------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        given: State,
        store: Store | None,
        now: int,
        *,
        risk_given: bool,
        policy_given: bool,
        kernel_threads: int | None = None,
        where: str = "the store",
    ) -> Control:
        """Continue the risk-list and policy versions kept in ``store`` and build the status book.

        Without a given risk list / policy the latest kept one is in force.  A given one that differs from the
        latest kept one becomes the next version: when statuses were published under the old one, the persons it
        affects are re-evaluated and the new version is kept in the same transaction as their changes, so the
        published statuses always belong to the list and policy in force (a restart never leaves them
        half-applied)."""
        if store is None:
            return cls(given)
        state = State(given.snapshot.risk, given.snapshot.policy, given.snapshot.policy_text)
        kept_list = store.latest_risk_list()
        kept_policy = store.latest_policy()
        if kept_list is not None:
            state.replace_risk_list(parse_risk_csv(kept_list[1], f"{where}: risk list v{kept_list[0]}"), kept_list[0])
        if kept_policy is not None:
            where_policy = f"{where}: policy v{kept_policy[0]}"
            state.replace_policy(parse_policy(kept_policy[1], where_policy), kept_policy[1], kept_policy[0])
        started = time.perf_counter()
        settings = store.settings()
        book = StatusBook(store, state.snapshot.policy, now, kernel_threads)
        logs.event(
            log,
            "store_opened",
            persons=len(book.ids),
            published=int(book.known.sum()),
            view_from=book.view_from,
            high_water_mark=book.high_water_mark,
            seconds=round(time.perf_counter() - started, 2),
            duckdb_memory_limit=settings["memory_limit"],
            duckdb_threads=settings["threads"],
        )
        control = cls(state, book)
        published = book.high_water_mark > 0
        wanted = given.snapshot
        if kept_policy is None or (policy_given and wanted.policy_text != kept_policy[1]):
            version = 1 if kept_policy is None else kept_policy[0] + 1
            if published:
                book.reevaluate(state.snapshot.risk, wanted.policy, now, keep_policy=(version, wanted.policy_text))
            else:
                store.record_policy(version, wanted.policy_text)
            state.replace_policy(wanted.policy, wanted.policy_text, version)
        if kept_list is None or (risk_given and wanted.risk.to_csv() != kept_list[1]):
            version = 1 if kept_list is None else kept_list[0] + 1
            new = wanted.risk.with_version(version)
            current = state.snapshot
            if published:
                summary = book.reevaluate_risk_change(current.risk, new, current.policy, now, keep=True)
                logs.event(
                    log,
                    "risk_list_replaced_at_start",
                    version=version,
                    evaluated=summary.evaluated,
                    changed=summary.changed,
                )
            else:
                store.record_risk_list(version, new.to_csv())
            state.replace_risk_list(new, version)
        return control

    # -- listeners --------------------------------------------------------------------------------------------

    def subscribe(self, listener: Listener) -> None:
        """Call ``listener`` after every change (from the thread that made it; it must not block)."""
        self._listeners.append(listener)

    def _notify(self, change: Change) -> Change:
        for listener in self._listeners:
            listener(change)
        return change

    @property
    def snapshot(self) -> Snapshot:
        return self.state.snapshot

    def need_book(self) -> StatusBook:
        """The status book, or :class:`~healthcode.errors.Precondition` on a server without a store."""
        if self.book is None:
            raise Precondition(NO_STORE)
        return self.book

    @staticmethod
    def _audit(who: str, action: str, version: int | None, detail: str) -> Callable[[Summary], AdminRow]:
        """The admin-log row of a change, made from its summary (kept in the transaction of its changes)."""

        def row(summary: Summary) -> AdminRow:
            counts = (
                f"evaluated {summary.evaluated}, changed {summary.changed}, high-water mark {summary.high_water_mark}"
            )
            return who, action, version, f"{detail}; {counts}"

        return row

    # -- changes ----------------------------------------------------------------------------------------------

    def put_risk_list(self, risk: RiskList, now: int, who: str) -> Change:
        """Replace the risk list (already validated): re-evaluate the persons it may affect, commit them with the
        new version and the audit row, publish, notify."""
        started = time.perf_counter()
        with self._lock:
            summary = None
            if self.book is not None:
                old = self.state.snapshot
                new = risk.with_version(old.risk_version + 1)
                self.book.refresh(old.policy, now)
                audit = self._audit(who, "put_risk_list", new.version, f"{len(risk)} entries")
                summary = self.book.reevaluate_risk_change(
                    self._installed(old), new, old.policy, now, keep=True, audit=audit
                )
                self._last_list = new
            snap = self.state.put_risk_list(risk)
        logs.event(log, "risk_list_replaced", version=snap.risk_version, entries=len(risk))
        change = self._notify(Change(snap, summary))
        logs.event(log, "risk_list_timings", level=logging.DEBUG, ms=_ms(started))
        return change

    def _installed(self, snap: Snapshot) -> RiskList:
        """The list in force, as the object the last change evaluated with (whose folded tables are built already)
        when it is that version."""
        last = self._last_list
        return last if last is not None and last.version == snap.risk_version else snap.risk

    def put_policy(self, timeline: PolicyTimeline, text: str, now: int, who: str) -> Change:
        """Replace the policy timeline (already validated; ``text`` its TOML): everyone is re-evaluated under it
        (windows and rules change for all), committed with the new version, published, audited, notified."""
        with self._lock:
            summary = None
            if self.book is not None:
                current = self.state.snapshot
                version = current.policy_version + 1
                self.book.refresh(timeline, now)
                audit = self._audit(who, "put_policy", version, f"{len(timeline.policies)} policies")
                summary = self.book.reevaluate(current.risk, timeline, now, keep_policy=(version, text), audit=audit)
            snap = self.state.put_policy(timeline, text)
        logs.event(log, "policy_replaced", version=snap.policy_version, policies=len(timeline.policies))
        return self._notify(Change(snap, summary))

    def reevaluate(self, as_of: int, who: str, progress: Callable[[int], None] | None = None) -> Change:
        """Time moves on: re-evaluate every stored person at ``as_of`` under the list and policy in force, commit
        and publish the changes, audit, notify.  Needs a store."""
        book = self.need_book()
        with self._lock:
            snap = self.state.snapshot
            book.refresh(snap.policy, as_of)
            audit = self._audit(who, "reevaluate", snap.risk_version, f"as_of {as_of}")
            summary = book.reevaluate(snap.risk, snap.policy, as_of, progress=progress, audit=audit)
        logs.event(log, "reevaluated", evaluated=summary.evaluated, changed=summary.changed)
        return self._notify(Change(snap, summary))

    def refresh(self, now: int) -> StatusBook:
        """The status book, rebuilt first from the store if an ingest group could not be merged into its view."""
        book = self.need_book()
        if book.stale:
            with self._lock:
                book.refresh(self.state.snapshot.policy, now)
        return book
