"""What the client's calls return: plain frozen dataclasses with names (reasons as :class:`~healthcode.Reason`
flags, instants as aware datetimes in Beijing time), built from the service's messages in one place.

A reason flag is both the name and the number: ``int(status.reasons)`` is the SPEC §4.6 mask (the proto's
``reasons_mask``), ``status.reason_names`` its names, lowest bit first.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from healthcode._proto.v1 import healthcode_pb2 as pb
from healthcode.rules.regions import RISK_CSV_HEADER
from healthcode.rules.results import Reason
from healthcode.rules.timebase import to_datetime


def reason_names(reasons: Reason | int) -> list[str]:
    """The names of the bits of a reasons mask, lowest first (``Reason(8 | 128)`` -> NAT_EXPIRED, PATTERN_NOT_MET)."""
    mask = int(reasons)
    return [r.name or "" for r in Reason if mask & r.value]


def _instant(ts: Any, present: bool = True) -> _dt.datetime | None:
    return to_datetime(ts.seconds) if present else None


@dataclass(frozen=True)
class Info:
    """What an evaluation used: the policy applied (the earliest while none is in force), the risk-list version
    and the instant."""

    policy: str
    policy_active: bool
    risk_list_version: int
    as_of: _dt.datetime

    @classmethod
    def of(cls, m: pb.EvaluationInfo) -> Info:
        return cls(m.policy, m.policy_active, m.risk_list_version, to_datetime(m.as_of.seconds))


@dataclass(frozen=True)
class Status:
    """One person's evaluation (SPEC §4); ``error`` is set exactly on invalid rows and unknown persons."""

    person_id: int
    commuter_badge: bool
    entry_permitted: bool
    enrolled: bool
    reasons: Reason
    badge_valid_until: _dt.datetime | None
    entry_valid_until: _dt.datetime | None
    error: str | None

    @property
    def reason_names(self) -> list[str]:
        return reason_names(self.reasons)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: reasons by name beside the mask, instants in ISO-8601 (+08:00)."""
        return {
            "person_id": self.person_id,
            "commuter_badge": self.commuter_badge,
            "entry_permitted": self.entry_permitted,
            "enrolled": self.enrolled,
            "reasons": self.reason_names,
            "reasons_mask": int(self.reasons),
            "badge_valid_until": None if self.badge_valid_until is None else self.badge_valid_until.isoformat(),
            "entry_valid_until": None if self.entry_valid_until is None else self.entry_valid_until.isoformat(),
            "error": self.error,
        }

    @classmethod
    def of(cls, m: pb.Status) -> Status:
        return cls(
            person_id=m.person_id,
            commuter_badge=m.commuter_badge,
            entry_permitted=m.entry_permitted,
            enrolled=m.enrolled,
            reasons=Reason(m.reasons_mask),
            badge_valid_until=_instant(m.badge_valid_until, m.HasField("badge_valid_until")),
            entry_valid_until=_instant(m.entry_valid_until, m.HasField("entry_valid_until")),
            error=m.error or None,
        )


@dataclass(frozen=True)
class Evaluation:
    """The answer of ``Client.evaluate``: one Status per person, in request order."""

    statuses: list[Status]
    info: Info
    invalid_rows: int

    @classmethod
    def of(cls, m: pb.EvaluateResponse) -> Evaluation:
        return cls([Status.of(s) for s in m.statuses], Info.of(m.info), m.invalid_rows)


@dataclass(frozen=True)
class Lookup:
    """The answer of ``Client.get_status``: one Status per id asked, in order; an id the store does not hold has
    only ``person_id`` and ``error`` set."""

    statuses: list[Status]
    info: Info
    not_found: int

    @classmethod
    def of(cls, m: pb.GetStatusResponse) -> Lookup:
        return cls([Status.of(s) for s in m.statuses], Info.of(m.info), m.not_found)


@dataclass(frozen=True)
class Reevaluation:
    """What one re-evaluation did (Reevaluate, and PutRiskList / PutPolicy on a server with a store)."""

    evaluated: int
    changed: int
    badges_lost: int
    badges_gained: int
    entries_lost: int
    entries_gained: int
    high_water_mark: int
    risk_list_version: int
    as_of: _dt.datetime
    regions_changed: int

    @classmethod
    def of(cls, m: pb.ReevaluationSummary) -> Reevaluation:
        return cls(
            m.evaluated, m.changed, m.badges_lost, m.badges_gained, m.entries_lost, m.entries_gained,
            m.high_water_mark, m.risk_list_version, to_datetime(m.as_of.seconds), m.regions_changed,
        )  # fmt: skip

    @classmethod
    def maybe(cls, parent: Any) -> Reevaluation | None:
        return cls.of(parent.reevaluation) if parent.HasField("reevaluation") else None


@dataclass(frozen=True)
class Change:
    """One published status change; the ``old_*`` fields are None on a person's first publish."""

    sequence: int
    person_id: int
    old_badge: bool | None
    new_badge: bool
    old_entry: bool | None
    new_entry: bool
    old_reasons: Reason | None
    new_reasons: Reason
    risk_list_version: int
    as_of: _dt.datetime

    @classmethod
    def of(cls, m: pb.StatusChange) -> Change:
        first = not m.HasField("old_reasons_mask")
        return cls(
            sequence=m.sequence,
            person_id=m.person_id,
            old_badge=None if first else m.old_badge,
            new_badge=m.new_badge,
            old_entry=None if first else m.old_entry,
            new_entry=m.new_entry,
            old_reasons=None if first else Reason(m.old_reasons_mask),
            new_reasons=Reason(m.new_reasons_mask),
            risk_list_version=m.risk_list_version,
            as_of=to_datetime(m.as_of.seconds),
        )

    @property
    def new_reason_names(self) -> list[str]:
        return reason_names(self.new_reasons)

    @property
    def old_reason_names(self) -> list[str] | None:
        return None if self.old_reasons is None else reason_names(self.old_reasons)

    @property
    def badge_lost(self) -> bool:
        """The person held the badge before this change and does not now."""
        return bool(self.old_badge) and not self.new_badge

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: reasons by name beside their masks, the instant in ISO-8601 (+08:00)."""
        old = None if self.old_reasons is None else int(self.old_reasons)
        return {  # the reasons by name beside the masks
            "sequence": self.sequence,
            "person_id": self.person_id,
            "old_badge": self.old_badge,
            "new_badge": self.new_badge,
            "old_entry": self.old_entry,
            "new_entry": self.new_entry,
            "old_reasons": self.old_reason_names,
            "old_reasons_mask": old,
            "new_reasons": self.new_reason_names,
            "new_reasons_mask": int(self.new_reasons),
            "risk_list_version": self.risk_list_version,
            "as_of": self.as_of.isoformat(),
        }


@dataclass(frozen=True)
class ChangeBatch:
    """One WatchChangesArrow message: the changes with sequence numbers first..last as an Arrow table (columns
    seq, person_id, old_badge, new_badge, old_entry, new_entry, old_reasons, new_reasons, risk_list_version,
    as_of; reasons as masks)."""

    first_sequence: int
    last_sequence: int
    table: pa.Table


@dataclass(frozen=True)
class IngestCounts:
    """What an ingest call stored: rows new to the store; rows whose key it already held (replays, and persons
    upserted again); of those, the persons whose values changed (``upsert_persons`` only)."""

    inserted: int
    already_present: int
    updated: int

    @classmethod
    def of(cls, m: Any) -> IngestCounts:
        return cls(m.inserted, m.already_present, m.updated)

    def __add__(self, other: IngestCounts) -> IngestCounts:
        return IngestCounts(
            self.inserted + other.inserted,
            self.already_present + other.already_present,
            self.updated + other.updated,
        )


@dataclass(frozen=True)
class RiskEntry:
    """One risk-list row (SPEC §3): dates ``YYYY-MM-DD`` inclusive, empty for unbounded."""

    region: int
    start_date: str
    end_date: str
    kind: str


@dataclass(frozen=True)
class RiskListVersion:
    """The risk list in force and its version."""

    version: int
    entries: list[RiskEntry]

    def csv(self) -> str:
        """The list as the CSV ``PutRiskList`` and ``healthcode serve --risk`` take."""
        rows = [f"{e.region},{e.start_date},{e.end_date},{e.kind}\n" for e in self.entries]
        return ",".join(RISK_CSV_HEADER) + "\n" + "".join(rows)

    @classmethod
    def of(cls, m: pb.GetRiskListResponse) -> RiskListVersion:
        return cls(m.version, [RiskEntry(e.region, e.start_date, e.end_date, e.kind) for e in m.entries])


@dataclass(frozen=True)
class RiskListChange:
    """The answer of ``Client.put_risk_list``: the new version, its entry count, and (with a store) the
    re-evaluation of the persons the change could affect."""

    version: int
    entries: int
    reevaluation: Reevaluation | None

    @classmethod
    def of(cls, m: pb.PutRiskListResponse) -> RiskListChange:
        return cls(m.version, m.entries, Reevaluation.maybe(m))


@dataclass(frozen=True)
class PolicyVersion:
    """The policy timeline in force: its version, policy names in effective_from order, and TOML text."""

    version: int
    names: list[str]
    toml: str

    @classmethod
    def of(cls, m: pb.GetPolicyResponse) -> PolicyVersion:
        return cls(m.version, list(m.names), m.toml)


@dataclass(frozen=True)
class PolicyChange:
    """The answer of ``Client.put_policy``; ``reevaluation`` set on a server with a store (everyone)."""

    version: int
    names: list[str]
    toml: str
    reevaluation: Reevaluation | None

    @classmethod
    def of(cls, m: pb.PutPolicyResponse) -> PolicyChange:
        return cls(m.version, list(m.names), m.toml, Reevaluation.maybe(m))
