"""Replay every fuzz seed (fuzz/corpus/<target>/) and every input that once crashed (fuzz/crashes/<target>/)
through its atheris harness's ``check``, so the corpora run in ``make test`` without atheris installed."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parents[2] / "fuzz"
sys.path.insert(0, str(FUZZ))

import _common  # noqa: E402

TARGETS = {
    "arrow_ipc": "fuzz_arrow_ipc",
    "rowform": "fuzz_rowform",
    "risk_csv": "fuzz_risk_csv",
    "policy_toml": "fuzz_policy_toml",
}
CASES = [
    pytest.param(module, path, id=f"{path.parent.parent.name}/{target}/{path.name}")
    for target, module in TARGETS.items()
    for path in _common.corpus_files(target)
]


def test_every_target_has_seeds() -> None:
    for target in TARGETS:
        assert any((_common.CORPUS_DIR / target).iterdir()), f"no seeds for {target}"


def test_corpus_is_small() -> None:
    size = sum(p.stat().st_size for d in (_common.CORPUS_DIR, _common.CRASHES_DIR) for p in d.rglob("*") if p.is_file())
    assert size < 1_000_000, f"fuzz corpora hold {size:,} bytes; keep them under 1 MB (minimise with -merge=1)"


@pytest.mark.parametrize(("module", "path"), CASES)
def test_replay(module: str, path: Path) -> None:
    importlib.import_module(module).check(path.read_bytes())
