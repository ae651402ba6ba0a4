"""The Python client of the healthcode service: channels (TLS, tokens), a typed call per RPC, plain values back."""

from healthcode.client.client import (
    DEFAULT_MESSAGE_BYTES,
    ChangeStream,
    Client,
    channel_credentials,
    make_channel,
    read_token,
)
from healthcode.client.values import (
    Change,
    ChangeBatch,
    Evaluation,
    Info,
    IngestCounts,
    Lookup,
    PolicyChange,
    PolicyVersion,
    Reevaluation,
    RiskEntry,
    RiskListChange,
    RiskListVersion,
    Status,
    reason_names,
)

__all__ = [
    "DEFAULT_MESSAGE_BYTES",
    "Change",
    "ChangeBatch",
    "ChangeStream",
    "Client",
    "Evaluation",
    "Info",
    "IngestCounts",
    "Lookup",
    "PolicyChange",
    "PolicyVersion",
    "Reevaluation",
    "RiskEntry",
    "RiskListChange",
    "RiskListVersion",
    "Status",
    "channel_credentials",
    "make_channel",
    "read_token",
    "reason_names",
]
