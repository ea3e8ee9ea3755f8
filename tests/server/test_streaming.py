"""SSE framing (server/streaming.py): each list of chunks goes out as one write of consecutive
events; an error mid-stream becomes a final error event; the stream always ends with [DONE]."""

from __future__ import annotations

import asyncio
import json

from modelhive.errors import InvalidRequestError
from modelhive.server.streaming import DONE, sse_events


def _writes(batches, fail: Exception | None = None) -> list[bytes]:
    async def chunks():
        for batch in batches:
            yield batch
        if fail is not None:
            raise fail

    async def main():
        return [w async for w in sse_events(chunks())]

    return asyncio.run(main())


def _events(write: bytes) -> list[dict]:
    assert write.endswith(b"\n\n")
    parts = write[:-2].split(b"\n\n")
    assert all(p.startswith(b"data: ") for p in parts)
    return [json.loads(p[6:]) for p in parts]


def test_a_batch_of_chunks_is_one_write_of_events_in_order():
    writes = _writes([[{"i": 0, "text": "a"}, {"i": 1, "text": "é\n"}], [{"i": 2, "text": None}]])
    assert len(writes) == 3 and writes[-1] == DONE
    assert _events(writes[0]) == [{"i": 0, "text": "a"}, {"i": 1, "text": "é\n"}]
    assert _events(writes[1]) == [{"i": 2, "text": None}]
    assert "é".encode() in writes[0]  # UTF-8 as is, not \\u escapes


def test_an_error_after_the_first_chunk_is_a_final_error_event():
    writes = _writes([[{"i": 0}]], fail=InvalidRequestError("bad thing", param="x"))
    assert _events(writes[0]) == [{"i": 0}]
    error = _events(writes[1])[0]["error"]
    assert "bad thing" in error["message"] and error["param"] == "x"
    assert writes[-1] == DONE
