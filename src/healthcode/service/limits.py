"""Call limits: concurrent calls (per caller and overall) and the overload guard, checked by the
:class:`~healthcode.service.auth.Guard` interceptor before any work starts.

Past a limit the call ends at once with RESOURCE_EXHAUSTED (:class:`LimitExceeded`) and a message naming the limit;
nothing queues.  (The rows-per-request limit is checked where requests are decoded: :mod:`healthcode.wire.limits`.)
"""

from __future__ import annotations

import asyncio
import collections
import threading

from healthcode.wire.limits import LimitExceeded


class Concurrency:
    """Counts calls in flight, overall and per caller.  ``max_total`` / ``max_per_caller`` of 0 mean no limit.

    :meth:`acquire` never waits: it takes a slot or raises :class:`LimitExceeded` naming the limit that is full.
    Used from the event loop; the lock only guards against a done-callback running on another thread."""

    def __init__(self, max_total: int, max_per_caller: int) -> None:
        self.max_total = max_total
        self.max_per_caller = max_per_caller
        self.total = 0
        self.by_caller: dict[str, int] = {}
        self._lock = threading.Lock()

    def acquire(self, caller: str, control: bool = False) -> None:
        """Take a slot for ``caller``.  A ``control``-plane call (:data:`CONTROL_METHODS`) is counted but not held
        to ``max_total``: an operator can replace the risk list while the data plane is at its limit."""
        with self._lock:
            mine = self.by_caller.get(caller, 0)
            if self.max_total and self.total >= self.max_total and not control:
                raise LimitExceeded(
                    f"the server is at its limit of concurrent calls (max_concurrent_calls = {self.max_total}); "
                    "retry with back-off"
                )
            if self.max_per_caller and mine >= self.max_per_caller:
                raise LimitExceeded(
                    f"caller {caller!r} is at its limit of concurrent calls "
                    f"(max_concurrent_calls_per_caller = {self.max_per_caller}); retry with back-off"
                )
            self.total += 1
            self.by_caller[caller] = mine + 1

    def release(self, caller: str) -> None:
        with self._lock:
            self.total -= 1
            left = self.by_caller.get(caller, 1) - 1
            if left > 0:
                self.by_caller[caller] = left
            else:
                self.by_caller.pop(caller, None)


#: Methods the overload guard never sheds: the control plane (a risk-list update is what causes the peaks).
CONTROL_METHODS = frozenset({"PutRiskList", "PutPolicy", "Reevaluate", "GetRiskList", "GetPolicy"})
#: Bulk methods, shed first (at half the lag threshold): the gateway path keeps the capacity they free.
BULK_METHODS = frozenset({"EvaluateArrow", "WatchChangesArrow"})


class Overload:
    """Sheds data-plane calls while the server's event loop is late (it is saturated and calls queue in gRPC's own
    queue, which the application cannot see).  A sampler sleeps ``interval`` seconds again and again and measures
    how late it wakes; the lag is the least lateness over the last ``window`` seconds.  While it is over
    ``threshold`` seconds (half of it for bulk calls) :meth:`check` raises :class:`LimitExceeded`; a refusal
    costs a fraction of serving the call, so the loop catches up and admitted calls stay fast.  ``threshold`` 0:
    never sheds."""

    def __init__(self, threshold: float, interval: float = 0.005, window: float = 0.25) -> None:
        self.threshold = threshold
        self.interval = interval
        self.window = window
        self.lag = 0.0
        self.shed = 0
        self._recent: collections.deque[tuple[float, float]] = collections.deque()  # (woke at, how late)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.threshold > 0 and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._sample(), name="healthcode-overload")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _sample(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await asyncio.sleep(self.interval)
            now = loop.time()
            recent = self._recent
            recent.append((now, max(0.0, now - started - self.interval)))
            while len(recent) > 1 and recent[1][0] <= now - self.window:
                recent.popleft()  # keep one sample from before the window: the window is always covered
            # The least lateness over the window (CoDel's "standing queue"): one slow callback is not an overload
            # (the wake-ups around it were on time); a loop late at every wake-up for the whole window is.
            self.lag = min(late for _, late in recent) if recent[0][0] <= now - self.window else 0.0

    def check(self, method: str) -> None:
        if self.threshold <= 0 or method in CONTROL_METHODS:
            return
        limit = self.threshold / 2 if method in BULK_METHODS else self.threshold
        if self.lag > limit:
            self.shed += 1
            raise LimitExceeded(
                f"the server is overloaded (its event loop is {self.lag * 1000:.0f} ms late, over the "
                f"{limit * 1000:.0f} ms of shed_loop_lag_ms{' / 2 for bulk calls' if method in BULK_METHODS else ''}); "
                "retry with back-off"
            )
