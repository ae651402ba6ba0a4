"""The numbers shared by the Python rules and the Cython kernel, defined once: the SPEC §4.6 reason bits, the
per-row validation error codes and their messages (SPEC §4.1), and the region-code range (SPEC §3).

``codes.pxd`` beside this module declares the same numbers as ``cdef enum``s for the kernel (``_kernel.pyx``
cimports them); ``tests/rules/test_codes.py`` holds the two equal, name by name, through ``_kernel.compiled_codes()``.
Plain Python: importable without the compiled kernel.
"""

from __future__ import annotations

# SPEC §4.6 reason bits (``results.Reason`` is the IntFlag of these).
POLICY_INACTIVE = 1 << 0
CODE_NOT_GREEN = 1 << 1
NAT_MISSING = 1 << 2
NAT_EXPIRED = 1 << 3
ENTRY_NAT_MISSING = 1 << 4
RISK_TRAVEL = 1 << 5
NOT_ENROLLED = 1 << 6
PATTERN_NOT_MET = 1 << 7
HOME_OUTSIDE_RING = 1 << 8
INVALID_INPUT = 1 << 15

REASON_BITS: dict[str, int] = {
    "POLICY_INACTIVE": POLICY_INACTIVE,
    "CODE_NOT_GREEN": CODE_NOT_GREEN,
    "NAT_MISSING": NAT_MISSING,
    "NAT_EXPIRED": NAT_EXPIRED,
    "ENTRY_NAT_MISSING": ENTRY_NAT_MISSING,
    "RISK_TRAVEL": RISK_TRAVEL,
    "NOT_ENROLLED": NOT_ENROLLED,
    "PATTERN_NOT_MET": PATTERN_NOT_MET,
    "HOME_OUTSIDE_RING": HOME_OUTSIDE_RING,
    "INVALID_INPUT": INVALID_INPUT,
}

# Per-row validation failures, numbered in checking order (the first failing check names the row's error).
ERR_PERSON_NULL = 1
ERR_HOME_NULL = 2
ERR_HOME_INVALID = 3
ERR_COLOR_NULL = 4
ERR_COLOR_INVALID = 5
ERR_ENTRY_NULL = 6
ERR_VISIT_NULL = 7
ERR_VISIT_REGION_NULL = 8
ERR_VISIT_REGION_INVALID = 9
ERR_VISIT_DAY_NULL = 10

_NOT_A_CODE = "is not a valid region code (six digits with a province-level prefix, GB/T 2260)"

#: The message of each error code; ``{i}`` is the list element's index.  Messages name the column and never
#: repeat the row's content.
ERROR_MESSAGES: dict[int, str] = {
    ERR_PERSON_NULL: "person_id is null",
    ERR_HOME_NULL: "home_region is null",
    ERR_HOME_INVALID: f"home_region {_NOT_A_CODE}",
    ERR_COLOR_NULL: "base_color is null",
    ERR_COLOR_INVALID: "base_color is not 0 (green), 1 (yellow) or 2 (red)",
    ERR_ENTRY_NULL: "entry_times[{i}] is null",
    ERR_VISIT_NULL: "visits[{i}] is null",
    ERR_VISIT_REGION_NULL: "visits[{i}].region is null",
    ERR_VISIT_REGION_INVALID: f"visits[{{i}}].region {_NOT_A_CODE}",
    ERR_VISIT_DAY_NULL: "visits[{i}].day is null",
}

ERROR_CODES: dict[str, int] = {
    "ERR_PERSON_NULL": ERR_PERSON_NULL,
    "ERR_HOME_NULL": ERR_HOME_NULL,
    "ERR_HOME_INVALID": ERR_HOME_INVALID,
    "ERR_COLOR_NULL": ERR_COLOR_NULL,
    "ERR_COLOR_INVALID": ERR_COLOR_INVALID,
    "ERR_ENTRY_NULL": ERR_ENTRY_NULL,
    "ERR_VISIT_NULL": ERR_VISIT_NULL,
    "ERR_VISIT_REGION_NULL": ERR_VISIT_REGION_NULL,
    "ERR_VISIT_REGION_INVALID": ERR_VISIT_REGION_INVALID,
    "ERR_VISIT_DAY_NULL": ERR_VISIT_DAY_NULL,
}

# SPEC §3 region codes: six digits, ``code // PROVINCE_DIVISOR`` the province-level prefix.
CODE_MIN, CODE_MAX = 100000, 999999
N_CODES = CODE_MAX - CODE_MIN + 1  # dense tables are indexed by code - CODE_MIN
PROVINCE_DIVISOR = 10000
N_PREFIXES = 100  # the province table is indexed by the two-digit prefix
#: The 34 province-level prefixes of GB/T 2260.
PROVINCES = (11, 12, 13, 14, 15, 21, 22, 23, 31, 32, 33, 34, 35, 36, 37, 41, 42, 43, 44, 45, 46,
             50, 51, 52, 53, 54, 61, 62, 63, 64, 65, 71, 81, 82)  # fmt: skip
#: The risk span table's hi for codes without a province-level prefix (int32 min + 1), so one table load tells the
#: kernel both whether a visit's region is valid and whether it hits.
SPAN_INVALID = -(2**31) + 1

REGION_CONSTANTS: dict[str, int] = {
    "CODE_MIN": CODE_MIN,
    "CODE_MAX": CODE_MAX,
    "N_CODES": N_CODES,
    "PROVINCE_DIVISOR": PROVINCE_DIVISOR,
    "N_PREFIXES": N_PREFIXES,
    "SPAN_INVALID": SPAN_INVALID,
}


def all_codes() -> dict[str, int]:
    """Every shared number by name (what ``_kernel.compiled_codes()`` must return, too)."""
    return {**REASON_BITS, **ERROR_CODES, **REGION_CONSTANTS}
