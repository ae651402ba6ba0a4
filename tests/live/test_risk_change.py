"""A risk-list change (issue 13): re-evaluating only the visitors of the changed regions logs exactly the changes a
full re-evaluation would, in the same order and with the same counts, with ingest overlay and new persons in the
view; the visitors of regions are each listed once, ascending; the audit row is committed with the changes or not
at all."""

from __future__ import annotations

from importlib import resources

import numpy as np
import pyarrow as pa
import pytest

from healthcode.generate import generate_batches, generate_risk_csv
from healthcode.live.control import Control
from healthcode.live.state import State
from healthcode.live.statusbook import StatusBook, changed_regions
from healthcode.rules import engine, policy
from healthcode.rules.flat import explode
from healthcode.rules.regions import RiskList, build_risk_table, parse_risk_csv, risk_list_from_rows
from healthcode.rules.timebase import day, day_to_date
from healthcode.store import Store

AS_OF = 1638244800  # 2021-11-30T12:00:00+08:00
TIMELINE = policy.default_policy()
COUNTIES = [110101, 110105, 110108, 120104, 131082, 130102, 310101, 451481]

pytestmark = pytest.mark.skipif(engine._kernel is None, reason="the kernel is not built")


@pytest.fixture(scope="module")
def population() -> pa.Table:
    return pa.Table.from_batches(list(generate_batches(3000, seed=31, as_of=AS_OF)))


def _book(path, population: pa.Table) -> StatusBook:
    store = Store(path)
    store.load_population(population)
    return StatusBook(store, TIMELINE, AS_OF, kernel_threads=2)


def _ingest(book: StatusBook, rng: np.random.Generator, known: np.ndarray) -> None:
    """New persons and new visits (of known and new persons) to the test counties inside the window: the view
    gets an overlay and slots past its base."""
    new_ids = np.arange(10**12, 10**12 + 40, dtype=np.uint64)
    who = np.concatenate([rng.choice(known, 120), new_ids, rng.choice(new_ids, 40)]).astype(np.uint64)
    days = day(AS_OF) - rng.integers(0, 6, len(who))
    items = [
        ("persons", pa.table({
            "person_id": pa.array(new_ids, pa.uint64()),
            "home_region": pa.array(rng.choice(COUNTIES, len(new_ids)).astype(np.int32)),
            "registered_commuter": pa.array(rng.random(len(new_ids)) < 0.5),
            "base_color": pa.array(rng.integers(0, 2, len(new_ids)).astype(np.int8)),
        })),
        ("visits", pa.table({
            "person_id": pa.array(who, pa.uint64()),
            "region": pa.array(rng.choice(COUNTIES, len(who)).astype(np.int32)),
            "day": pa.array([day_to_date(int(d)) for d in days], pa.date32()),
        })),
    ]  # fmt: skip
    prepared = [(kind, Store.prepare_ingest(kind, table)) for kind, table in items]
    results = book.store.ingest_group(prepared, prepared=True)
    assert not [r for r in results if isinstance(r, Exception)], results
    book.ingested(prepared, AS_OF)


def _edit(rng: np.random.Generator, rows: list[tuple[int, str, str, str]]) -> list[tuple[int, str, str, str]]:
    """Add counties, a prefecture or a province listed a few days ago, or lift an entry."""
    out = list(rows)
    for _ in range(int(rng.integers(1, 4))):
        if out and rng.random() < 0.3:
            out.pop(int(rng.integers(len(out))))
            continue
        county = int(rng.choice(COUNTIES))
        region = int(rng.choice([county, county // 100 * 100, county // 10000 * 10000], p=[0.7, 0.2, 0.1]))
        start = day_to_date(day(AS_OF) - int(rng.integers(0, 8))).isoformat()
        out.append((region, start, "", "local_case"))
    return out


def _counts(summary) -> tuple[int, ...]:
    return (summary.changed, summary.badges_lost, summary.badges_gained, summary.entries_lost,
            summary.entries_gained, summary.high_water_mark, summary.risk_list_version)  # fmt: skip


@pytest.mark.parametrize("seed", range(3))
def test_a_risk_change_logs_what_a_full_reevaluation_would_change(tmp_path, population, seed):
    rng = np.random.default_rng(seed)
    partial, full = _book(tmp_path / "a.duckdb", population), _book(tmp_path / "b.duckdb", population)
    rows = [tuple(r) for r in parse_risk_csv(generate_risk_csv(seed, AS_OF)).rows()]
    current = risk_list_from_rows(rows, version=1)
    for book in (partial, full):
        book.reevaluate(current, TIMELINE, AS_OF)
    known = partial.ids.copy()
    for version in range(2, 6):
        if version == 3:  # ingest between changes: an overlay, and persons past the base (published by a full
            for book in (partial, full):  # re-evaluation: a risk change publishes only the visitors it evaluates)
                _ingest(book, np.random.default_rng(seed), known)
                book.reevaluate(current, TIMELINE, AS_OF)
            assert len(partial.view.state.extra_ids) == 40 and len(partial.view.state.overlay_slots) > 40
        rows = _edit(rng, rows)
        new = risk_list_from_rows(rows, version=version)
        mark = partial.high_water_mark
        got = partial.reevaluate_risk_change(current, new, TIMELINE, AS_OF)
        want = full.reevaluate(new, TIMELINE, AS_OF)
        assert got.evaluated <= want.evaluated
        assert _counts(got) == _counts(want), (seed, version)
        got_log, want_log = partial.store.changes(mark, 10**6), full.store.changes(mark, 10**6)
        assert got_log.num_rows == got.changed
        assert got_log.equals(want_log), (seed, version)  # same rows, same order, same sequence numbers
        had_badge, has_badge, had_entry, has_entry = (
            got_log.column(name).fill_null(False).to_numpy(zero_copy_only=False)
            for name in ("old_badge", "new_badge", "old_entry", "new_entry")
        )
        assert (got.badges_lost, got.badges_gained, got.entries_lost, got.entries_gained) == (
            np.sum(had_badge & ~has_badge), np.sum(has_badge & ~had_badge),
            np.sum(had_entry & ~has_entry), np.sum(has_entry & ~had_entry),
        )  # fmt: skip
        ids = got_log.column("person_id").to_numpy()
        assert (np.diff(partial.rows_of(ids)) > 0).all()  # in slot order
        for name in ("known", "badge", "entry", "reasons"):
            np.testing.assert_array_equal(getattr(partial, name), getattr(full, name))
        current = new


def _visitors(state, codes: list[int]) -> np.ndarray:
    """Brute force: every slot whose base row or overlay row has a visit to one of ``codes``."""
    base = explode(state.base)
    slots = base.v_row[np.isin(base.v_region, codes)]
    if len(state.overlay_slots):
        overlay = explode(state.overlay)
        slots = np.concatenate([slots, state.overlay_slots[overlay.v_row[np.isin(overlay.v_region, codes)]]])
    return np.unique(slots)


def test_the_visitors_of_regions_are_each_listed_once_in_slot_order(tmp_path, population):
    book = _book(tmp_path / "s.duckdb", population)
    book.reevaluate(parse_risk_csv(generate_risk_csv(1, AS_OF)).with_version(1), TIMELINE, AS_OF)
    _ingest(book, np.random.default_rng(4), book.ids.copy())
    state = book.view.state
    flat = explode(state.base)
    codes, visits = np.unique(flat.v_region, return_counts=True)
    rare = codes[np.argsort(visits, kind="stable")[:3]].tolist()  # a few visits: merged, no bitmap
    assert visits[np.isin(codes, rare)].sum() * 8 < state.n_persons
    pairs, times = np.unique(flat.v_row.astype(np.int64) * 10**6 + flat.v_region, return_counts=True)
    twice = np.unique(pairs[times > 1] % 10**6)  # regions a person visited on several days
    repeated = int(twice[np.argmin(visits[np.searchsorted(codes, twice)])])
    assert visits[codes == repeated][0] * 8 < state.n_persons
    everywhere = codes.tolist() + COUNTIES  # most visits of the population: a bitmap over the slots
    for regions in ([rare[0]], [repeated], [*rare, repeated], [*rare, COUNTIES[0]], COUNTIES, everywhere, []):
        want = _visitors(state, regions)
        got = book.rows_visiting(np.array([*regions, 99999, 100000], dtype=np.int64))  # codes nobody visits
        np.testing.assert_array_equal(got, want, err_msg=str(regions[:5]))
        assert got.dtype == np.int64


def test_the_audit_row_is_committed_with_the_changes_or_not_at_all(tmp_path, population):
    store = Store(tmp_path / "c.duckdb")
    store.load_population(population)
    text = resources.files("healthcode").joinpath("data/default_policy.toml").read_text("utf-8")
    state = State(parse_risk_csv(generate_risk_csv(2, AS_OF)), TIMELINE, text)
    control = Control.open(state, store, AS_OF, risk_given=True, policy_given=False)
    control.reevaluate(AS_OF, "tester")
    book = control.book
    assert book is not None
    listed = risk_list_from_rows([*control.snapshot.risk.rows(), (110108, "2021-11-27", "", "local_case")])
    mark, audit_rows = store.high_water_mark(), store.admin_log().num_rows
    published = [getattr(book, name).copy() for name in ("known", "badge", "entry", "reasons")]

    def refuse(summary):
        raise RuntimeError("the audit row cannot be made")

    with pytest.raises(RuntimeError, match="audit row"):
        book.reevaluate_risk_change(
            control.snapshot.risk, listed.with_version(9), TIMELINE, AS_OF, keep=True, audit=refuse
        )
    assert store.high_water_mark() == mark == book.high_water_mark and store.changes(mark).num_rows == 0
    assert store.admin_log().num_rows == audit_rows and store.latest_risk_list()[0] == 1
    for before, name in zip(published, ("known", "badge", "entry", "reasons"), strict=True):
        np.testing.assert_array_equal(getattr(book, name), before)

    change = control.put_risk_list(listed, AS_OF, "tester")
    summary = change.summary
    assert summary is not None and summary.changed > 0
    last = store.admin_log().to_pylist()[-1]
    assert (last["caller"], last["action"], last["version"]) == ("tester", "put_risk_list", 2)
    assert last["detail"].endswith(
        f"evaluated {summary.evaluated}, changed {summary.changed}, high-water mark {summary.high_water_mark}"
    )
    assert summary.high_water_mark == mark + summary.changed == store.high_water_mark()
    # The next change starts from the list in force (its folded table reused): lifting it again undoes it.
    lifted = control.put_risk_list(control.snapshot.risk.with_version(None), AS_OF, "tester").summary
    assert lifted is not None and lifted.changed == 0 and lifted.regions_changed == 0
    back = control.put_risk_list(parse_risk_csv(generate_risk_csv(2, AS_OF)), AS_OF, "tester").summary
    assert back is not None and back.changed == summary.changed
    assert (back.badges_gained, back.entries_gained) == (summary.badges_lost, summary.entries_lost)


def _listed(*rows: tuple[int, str, str, str]) -> RiskList:
    return risk_list_from_rows(list(rows), version=1)


def test_a_changed_interval_inside_an_unchanged_hull_is_a_changed_region():
    def table(risk: RiskList):  # a policy matching on the visit day keeps several intervals per region
        return build_risk_table(risk, day(AS_OF), 14, "on_visit_day")

    early, late = (110101, "2021-11-20", "2021-11-22", "local_case"), (110101, "2021-11-26", "2021-11-29", "local_case")
    two = _listed(early, late)
    moved = _listed((110101, "2021-11-20", "2021-11-23", "local_case"), late)  # same hull, first interval longer
    other = _listed(early, late, (310101, "2021-11-28", "", "local_case"))
    assert changed_regions(table(two), table(two)).tolist() == []
    assert 110101 in changed_regions(table(two), table(moved)).tolist()
    added = set(changed_regions(table(two), table(other)).tolist())
    assert 310101 in added and added <= {310101, 310100, 310000}
