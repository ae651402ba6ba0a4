"""The error column's messages written by the kernel (``_kernel.error_texts``) equal the ones Arrow compute builds
(the path without the extension), for every message, element index (negative ones too) and spread of rows."""

from __future__ import annotations

import numpy as np
import pytest

from healthcode.rules import engine, results

pytestmark = pytest.mark.skipif(engine._kernel is None, reason="the kernel is not built")


def test_the_kernel_writes_the_messages_arrow_compute_writes():
    rng = np.random.default_rng(1)
    codes = np.array(sorted(results.ERROR_MESSAGES), dtype=np.uint8)
    for trial in range(200):
        n = int(rng.integers(1, 500))
        k = int(rng.integers(0, n + 1))
        rows = np.sort(rng.choice(n, k, replace=False)).astype(np.int64)
        err_code = rng.choice(codes, k).astype(np.uint8)
        err_index = rng.integers(-3, 10**9, k).astype(np.int32)
        texts = engine._kernel.error_texts(err_code, err_index, results.MESSAGE_HEADS, results.MESSAGE_TAILS)
        got = results.error_column(n, rows, err_code, err_index, texts)
        want = results.error_column(n, rows, err_code, err_index)
        assert got.equals(want), f"trial {trial}"
    code, index = np.array([codes[0]], np.uint8), np.array([0], np.int32)
    texts = engine._kernel.error_texts(code, index, results.MESSAGE_HEADS, results.MESSAGE_TAILS)
    one = results.error_column(3, np.array([1]), code, index, texts)
    assert one.to_pylist() == [None, results.ERROR_MESSAGES[int(codes[0])].replace("{i}", "0"), None]
