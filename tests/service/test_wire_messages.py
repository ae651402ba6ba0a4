"""Messages the server serializes by hand are the bytes protobuf writes."""

from __future__ import annotations

import os

import pytest

from healthcode._proto.v1 import healthcode_pb2 as pb
from healthcode.wire.ipc import arrow_response


@pytest.mark.parametrize(
    ("size", "rows"), [(0, 0), (1, 0), (0, 5), (300, 1), (70_000, 2**40), (4 << 20, 32_768), (127, 127), (128, 128)]
)
def test_an_arrow_response_is_the_message_protobuf_writes(size: int, rows: int) -> None:
    data = os.urandom(size)
    assert arrow_response(data, rows) == pb.EvaluateArrowResponse(arrow_ipc=data, rows=rows).SerializeToString()
