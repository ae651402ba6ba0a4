"""healthcode: Beijing commuter (通勤) badge and entry evaluation over Arrow columns (the rules: docs/SPEC.md)."""

from healthcode.errors import CorruptDataError, HealthcodeError, PolicyError, RiskListError, SchemaError, StoreError
from healthcode.rules.engine import evaluate
from healthcode.rules.policy import Policy, PolicyTimeline, default_policy, load_policy, parse_policy
from healthcode.rules.regions import RiskList, load_risk_list, parse_risk_csv, risk_list_from_rows
from healthcode.rules.results import RESULT_SCHEMA, Reason

__all__ = [
    "RESULT_SCHEMA",
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
    "risk_list_from_rows",
]
__version__ = "0.1.0"
