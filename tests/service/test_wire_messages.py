"""Messages the server serializes by hand are the bytes protobuf writes."""

from __future__ import annotations

import os

import pytest
from google.protobuf.message import DecodeError

from healthcode._proto.v1 import healthcode_pb2 as pb
from healthcode.wire.ipc import arrow_response


@pytest.mark.parametrize(
    ("size", "rows"), [(0, 0), (1, 0), (0, 5), (300, 1), (70_000, 2**40), (4 << 20, 32_768), (127, 127), (128, 128)]
)
def test_an_arrow_response_is_the_message_protobuf_writes(size: int, rows: int) -> None:
    data = os.urandom(size)
    assert arrow_response(data, rows) == pb.EvaluateArrowResponse(arrow_ipc=data, rows=rows).SerializeToString()


def _protobuf_reading(data: bytes) -> tuple[bytes | None, bytes] | None:
    try:
        m = pb.EvaluateArrowRequest.FromString(data)
    except DecodeError:
        return None
    return (m.options.SerializeToString() if m.HasField("options") else None), m.arrow_ipc


def test_an_arrow_request_read_in_place_is_what_protobuf_reads() -> None:
    """split_arrow_request reads the plain shape (options, arrow_ipc; repeats merged) as protobuf does, and leaves
    every other shape, and random damage, to protobuf (None)."""
    import random

    from healthcode.wire.ipc import split_arrow_request

    options = pb.EvaluateOptions(policy="beijing-2021")
    options.as_of.seconds = 1638244800
    plain = [
        pb.EvaluateArrowRequest(options=options, arrow_ipc=os.urandom(300)).SerializeToString(),
        pb.EvaluateArrowRequest(arrow_ipc=os.urandom(70_000)).SerializeToString(),
        pb.EvaluateArrowRequest(options=options).SerializeToString(),
        pb.EvaluateArrowRequest(options=pb.EvaluateOptions()).SerializeToString(),
        b"",
    ]
    plain.append(plain[0] + plain[1])  # repeats: options merged, the last arrow_ipc kept
    for data in plain:
        got = split_arrow_request(data)
        assert got is not None
        want = _protobuf_reading(data)
        assert want is not None
        merged = None if got[0] is None else pb.EvaluateOptions.FromString(got[0]).SerializeToString()
        assert (merged, bytes(got[1])) == want
    rng = random.Random(7)
    for _ in range(3_000):
        data = bytearray(rng.choice(plain[:4]))
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(data) + 1)
            if at < len(data) and rng.random() < 0.7:
                data[at] = rng.randrange(256)
            else:
                data[at:at] = bytes([rng.randrange(256)])
        got = split_arrow_request(bytes(data))
        if got is not None:  # read in place: protobuf reads the same (options compared as messages)
            want = _protobuf_reading(bytes(data))
            if want is None:  # only the options can be what protobuf refuses: the server then asks protobuf
                with pytest.raises(DecodeError):
                    pb.EvaluateOptions.FromString(got[0] or b"")
                continue
            if got[0] is not None and want[0] is not None:
                try:
                    mine = pb.EvaluateOptions.FromString(got[0]).SerializeToString()
                except Exception:
                    continue  # malformed options: the server asks protobuf to read the whole request then
                assert mine == want[0]
            assert bytes(got[1]) == want[1]
