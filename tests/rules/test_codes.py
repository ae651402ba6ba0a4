"""The shared numbers are defined once: the kernel's compiled enums (``codes.pxd``) equal ``healthcode.rules.codes``,
name by name, and the public names built from them (``Reason``, ``ERROR_MESSAGES``, the region constants) agree."""

from __future__ import annotations

import numpy as np
import pytest

from healthcode.rules import codes, regions, results

try:
    from healthcode.rules import _kernel  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - the extension is built by `pip install .`
    _kernel = None


@pytest.mark.skipif(_kernel is None, reason="the Cython kernel is not built")
def test_the_kernel_compiled_every_shared_number_as_codes_defines_it() -> None:
    assert _kernel.compiled_codes() == codes.all_codes()


def test_reason_is_the_reason_bits() -> None:
    assert {r.name: r.value for r in results.Reason} == codes.REASON_BITS


def test_error_messages_are_numbered_in_checking_order() -> None:
    assert results.ERROR_MESSAGES is codes.ERROR_MESSAGES
    assert list(codes.ERROR_MESSAGES) == list(range(1, len(codes.ERROR_CODES) + 1))
    assert sorted(codes.ERROR_CODES.values()) == list(codes.ERROR_MESSAGES)


def test_region_constants_are_the_codes_ones() -> None:
    assert (regions.CODE_MIN, regions.CODE_MAX, regions.N_CODES) == (codes.CODE_MIN, codes.CODE_MAX, codes.N_CODES)
    assert regions.N_CODES == regions.CODE_MAX - regions.CODE_MIN + 1
    assert regions.SPAN_INVALID == np.iinfo(np.int32).min + 1
    assert len(codes.PROVINCES) == 34 and max(codes.PROVINCES) < codes.N_PREFIXES
    assert codes.CODE_MIN // codes.PROVINCE_DIVISOR == 10 and codes.CODE_MAX // codes.PROVINCE_DIVISOR == 99
    assert np.flatnonzero(regions.PROVINCE_OK).tolist() == list(codes.PROVINCES)

