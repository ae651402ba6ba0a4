"""The risk list and the policy timeline in force, each replaced atomically with a new version number.

An evaluation takes one :class:`Snapshot` at its start and uses it throughout, so it sees the old list or the new one,
never a mix: a replacement builds the new snapshot completely, then swaps one reference.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace

from healthcode.rules.policy import PolicyTimeline
from healthcode.rules.regions import RiskList


@dataclass(frozen=True)
class Snapshot:
    risk: RiskList  # carries its version
    policy: PolicyTimeline
    policy_text: str
    policy_version: int

    @property
    def risk_version(self) -> int:
        return self.risk.version or 0


class State:
    """Holds the current snapshot; writers are serialised, readers never block."""

    def __init__(self, risk: RiskList, policy: PolicyTimeline, policy_text: str) -> None:
        self._lock = threading.Lock()
        self._snapshot = Snapshot(risk.with_version(risk.version or 1), policy, policy_text, 1)

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    def put_risk_list(self, risk: RiskList) -> Snapshot:
        """Install ``risk`` (already validated) as the next version; returns the new snapshot."""
        with self._lock:
            current = self._snapshot
            self._snapshot = replace(current, risk=risk.with_version(current.risk_version + 1))
            return self._snapshot

    def replace_risk_list(self, risk: RiskList, version: int) -> Snapshot:
        """Install ``risk`` under an explicit version (start-up, continuing the versions kept in a store)."""
        with self._lock:
            self._snapshot = replace(self._snapshot, risk=risk.with_version(version))
            return self._snapshot

    def put_policy(self, policy: PolicyTimeline, text: str) -> Snapshot:
        with self._lock:
            current = self._snapshot
            self._snapshot = replace(
                current, policy=policy, policy_text=text, policy_version=current.policy_version + 1
            )
            return self._snapshot

    def replace_policy(self, policy: PolicyTimeline, text: str, version: int) -> Snapshot:
        """Install a policy under an explicit version (start-up, continuing the versions kept in a store)."""
        with self._lock:
            self._snapshot = replace(self._snapshot, policy=policy, policy_text=text, policy_version=version)
            return self._snapshot
