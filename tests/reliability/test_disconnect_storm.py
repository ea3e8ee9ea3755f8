"""Item 4: 100 streaming clients cut at random points (real subprocess, tiny presets).

tests/server cuts 50 clients after their second event; here each of 100 raw-socket clients is cut
at a random point of its own: before the response head, after a random number of bytes (often in
the middle of an SSE event), or after a random number of events, some with an abortive close (RST).
While they run, /metrics is scraped: the stats snapshot must always add up (blocks used by all
models + free == total, the allocator's invariant as the HTTP side sees it). Afterwards every block
is free, nothing runs or waits, and the server answers both models. No admin endpoint is needed.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import struct
import time

import httpx

from tests.reliability.conftest import pool_figures, wait_pool_free

CLIENTS = 100
MODELS = ("tiny-llama", "tiny-qwen2")
SEED = 20240611


def request_bytes(port: int, i: int) -> bytes:
    model = MODELS[i % 2]
    if i % 3 == 0:
        path = "/v1/chat/completions"
        body = {"messages": [{"role": "user", "content": f"storm {i}"}]}
    else:
        path, body = "/v1/completions", {"prompt": f"storm {i}"}
    body.update(model=model, max_tokens=400, ignore_eos=True, stream=True)
    payload = json.dumps(body).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n")
    return head.encode() + payload


async def cut_client(port: int, i: int, rng: random.Random) -> str:
    """Send one streaming request and cut the connection at a random point; returns where."""
    mode = rng.choice(["before-head", "after-bytes", "after-events"])
    wait_s = rng.uniform(0, 0.05)
    byte_budget = rng.randint(1, 6000)
    event_budget = rng.randint(1, 60)
    abortive = rng.random() < 0.3
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request_bytes(port, i))
        await writer.drain()
        if mode == "before-head":
            await asyncio.sleep(wait_s)
            return mode
        received = b""
        while True:
            chunk = await asyncio.wait_for(reader.read(512), 30)
            if not chunk:  # the whole stream arrived before this client's cut point
                assert received.rstrip().endswith(b"0"), received[-300:]
                assert b"data: [DONE]" in received and b'"error"' not in received
                return "completed"
            received += chunk
            if mode == "after-bytes" and len(received) >= byte_budget:
                return f"{mode}:{len(received)}"
            if mode == "after-events" and received.count(b"data: ") >= event_budget:
                return f"{mode}:{event_budget}"
    finally:
        if abortive:  # RST instead of FIN
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.close()


def test_hundred_random_cuts_leave_the_pool_whole(server):
    rng = random.Random(SEED)
    seeds = [rng.random() for _ in range(CLIENTS)]
    snapshots: list[dict[str, float]] = []

    async def scrape_while(task: asyncio.Future) -> None:
        async with httpx.AsyncClient(base_url=server.url(), timeout=10) as client:
            while not task.done():
                await client.get("/metrics")  # exercise the endpoint under the storm
                snapshots.append(await asyncio.to_thread(pool_figures, server.url()))
                await asyncio.sleep(0.05)

    async def storm() -> list[str]:
        clients = asyncio.gather(*(cut_client(server.port, i, random.Random(s))
                                   for i, s in enumerate(seeds)))
        await asyncio.gather(clients, scrape_while(clients))
        return clients.result()

    started = time.monotonic()
    cuts = asyncio.run(storm())
    storm_s = time.monotonic() - started
    figures = wait_pool_free(server.url())
    kinds = {k: sum(c.startswith(k) for c in cuts) for k in ("before-head", "after-bytes",
                                                             "after-events")}
    print(f"\ndisconnect storm: {CLIENTS} clients cut ({kinds}) in {storm_s:.1f} s; "
          f"{len(snapshots)} /metrics scrapes mid-storm, max blocks used "
          f"{max(s['used'] for s in snapshots)}; afterwards {figures}")
    assert len(cuts) == CLIENTS and all(kinds.values())
    assert sum(kinds.values()) >= 0.9 * CLIENTS  # nearly all were cut mid-way, not completed
    assert snapshots and any(s["used"] > 0 for s in snapshots)  # the storm did hold blocks
    for s in snapshots:
        assert s["used"] + s["free"] == s["total"], s
    for model in MODELS:
        r = httpx.post(server.url() + "/v1/completions",
                       json={"model": model, "prompt": "after the storm", "max_tokens": 5,
                             "ignore_eos": True}, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
    wait_pool_free(server.url())
