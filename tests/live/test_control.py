"""The control layer on a real store: every change re-evaluates, commits with its version, audits and notifies, and
start-up continues (or advances) the versions a store keeps."""

from __future__ import annotations

from importlib import resources

import pyarrow as pa
import pytest

from healthcode.errors import Precondition
from healthcode.generate import generate_batches, generate_risk_csv
from healthcode.live.control import Change, Control
from healthcode.live.state import State
from healthcode.rules import engine
from healthcode.rules.policy import default_policy
from healthcode.rules.regions import parse_risk_csv
from healthcode.store import Store

AS_OF = 1638244800  # 2021-11-30T12:00:00+08:00
EMPTY = "region,start_date,end_date,kind\n"
POLICY = resources.files("healthcode").joinpath("data/default_policy.toml").read_text("utf-8")

pytestmark = pytest.mark.skipif(engine._kernel is None, reason="the kernel is not built")


def _state(csv: str) -> State:
    return State(parse_risk_csv(csv, "test"), default_policy(), POLICY)


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "store.duckdb") as s:
        s.load_population(pa.Table.from_batches(list(generate_batches(2000, seed=7, as_of=AS_OF))))
        yield s


def test_without_a_store_only_the_snapshot_changes():
    control = Control(_state(EMPTY))
    seen: list[Change] = []
    control.subscribe(seen.append)
    change = control.put_risk_list(parse_risk_csv(generate_risk_csv(3, AS_OF), "new"), AS_OF, "tester")
    assert change.summary is None and change.snapshot.risk_version == 2 == control.snapshot.risk_version
    assert seen == [change]
    with pytest.raises(Precondition, match="no store"):
        control.reevaluate(AS_OF, "tester")


def test_a_new_store_keeps_the_first_versions_and_every_change_is_committed_and_audited(store):
    control = Control.open(_state(generate_risk_csv(3, AS_OF)), store, AS_OF, risk_given=True, policy_given=False)
    assert store.latest_risk_list()[0] == 1 and store.latest_policy()[0] == 1
    first = control.reevaluate(AS_OF, "tester").summary
    assert control.book is not None and len(control.book.ids) > 1900
    assert first is not None and first.evaluated == first.changed == len(control.book.ids) == store.high_water_mark()

    seen: list[Change] = []
    control.subscribe(seen.append)
    change = control.put_risk_list(parse_risk_csv(EMPTY, "emptied"), AS_OF, "tester")
    assert change.snapshot.risk_version == 2 and store.latest_risk_list() == (2, parse_risk_csv(EMPTY, "e").to_csv())
    assert change.summary is not None and change.summary.risk_list_version == 2
    assert store.high_water_mark() == first.changed + change.summary.changed  # the changes and the list: one commit
    later = control.put_policy(default_policy(), POLICY + "# again\n", AS_OF, "tester")
    assert later.snapshot.policy_version == 2 and store.latest_policy()[0] == 2
    assert seen == [change, later]
    audit = store.admin_log().to_pylist()
    assert [row["action"] for row in audit] == ["reevaluate", "put_risk_list", "put_policy"]
    assert {row["caller"] for row in audit} == {"tester"}


def test_start_up_continues_the_kept_versions_and_advances_a_different_list(store):
    Control.open(_state(generate_risk_csv(3, AS_OF)), store, AS_OF, risk_given=True, policy_given=False).reevaluate(
        AS_OF, "tester"
    )
    published = store.high_water_mark()
    # No list given: the kept one stays in force, nothing is re-evaluated.
    kept = Control.open(_state(EMPTY), store, AS_OF, risk_given=False, policy_given=False)
    assert kept.snapshot.risk_version == 1 and len(kept.snapshot.risk) > 0 and store.high_water_mark() == published
    # A different list given: the next version, kept with the changes it causes.
    moved = Control.open(_state(EMPTY), store, AS_OF, risk_given=True, policy_given=False)
    assert moved.snapshot.risk_version == 2 == store.latest_risk_list()[0] and len(moved.snapshot.risk) == 0
    assert store.high_water_mark() > published
