"""healthcode: Beijing commuter (通勤) badge and entry evaluation over Arrow columns (the rules: docs/SPEC.md).

The library face: ``healthcode.evaluate`` and the loaders run the rules in this process; ``healthcode.Client``
calls a running server (imported on first use, so ``import healthcode`` does not load gRPC).
"""

from typing import Any

from healthcode.errors import CorruptDataError, HealthcodeError, PolicyError, RiskListError, SchemaError, StoreError
from healthcode.rules.engine import evaluate
from healthcode.rules.policy import Policy, PolicyTimeline, default_policy, load_policy, parse_policy
from healthcode.rules.regions import RiskList, load_risk_list, parse_risk_csv, risk_list_from_rows
from healthcode.rules.results import RESULT_SCHEMA, Reason

#: Names served from :mod:`healthcode.client` on first use.
_CLIENT_NAMES = ("Client", "read_token")

__all__ = [
    "RESULT_SCHEMA",
    "Client",
    "CorruptDataError",
    "HealthcodeError",
    "Policy",
    "PolicyError",
    "PolicyTimeline",
    "Reason",
    "RiskList",
    "RiskListError",
    "SchemaError",
    "StoreError",
    "default_policy",
    "evaluate",
    "load_policy",
    "load_risk_list",
    "parse_policy",
    "parse_risk_csv",
    "read_token",
    "risk_list_from_rows",
]
__version__ = "0.2.0"


def __getattr__(name: str) -> Any:
    if name in _CLIENT_NAMES:
        from healthcode import client

        return getattr(client, name)
    raise AttributeError(f"module 'healthcode' has no attribute {name!r}")
