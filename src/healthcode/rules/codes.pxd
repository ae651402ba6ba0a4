# The numbers shared with the Python rules, for the kernel: the same names and values as
# ``healthcode/rules/codes.py`` (the one definition; ``tests/rules/test_codes.py`` compares every name and value
# through ``_kernel.compiled_codes()``).  Edit both together.

# SPEC §4.6 reason bits.
cdef enum:
    POLICY_INACTIVE = 1
    CODE_NOT_GREEN = 2
    NAT_MISSING = 4
    NAT_EXPIRED = 8
    ENTRY_NAT_MISSING = 16
    RISK_TRAVEL = 32
    NOT_ENROLLED = 64
    PATTERN_NOT_MET = 128
    HOME_OUTSIDE_RING = 256
    INVALID_INPUT = 32768

# Validation failures, in checking order (codes.ERROR_MESSAGES).
cdef enum:
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

# SPEC §3 region codes.
cdef enum:
    CODE_MIN = 100000
    CODE_MAX = 999999
    N_CODES = 900000
    PROVINCE_DIVISOR = 10000
    N_PREFIXES = 100
    SPAN_INVALID = -2147483647
