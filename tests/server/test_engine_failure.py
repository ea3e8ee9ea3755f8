"""In-process app (create_app + TestClient): when the engine loop dies, an open stream ends with an
error event, /health turns 503, and new requests get 503, all in OpenAI's error shape."""

from __future__ import annotations

import json

from fastapi.testclient import TestClient

from modelhive.config import ModelSpec
from modelhive.engine.client import AsyncEngine
from modelhive.engine.hive import build_engine
from modelhive.server.app import create_app


def test_dead_engine_loop_is_reported():
    engine = build_engine([ModelSpec(name="t", source="preset:tiny-llama", max_model_len=256,
                                     max_num_seqs=4)], device="cpu", memory="64MiB")
    async_engine = AsyncEngine(engine)
    with TestClient(create_app(async_engine, manage_engine=True)) as client:
        assert client.get("/health").status_code == 200
        ok = client.post("/v1/completions", json={"model": "t", "prompt": "x", "max_tokens": 3})
        assert ok.status_code == 200

        def broken_step():
            raise RuntimeError("injected failure")

        async_engine.call(lambda eng: setattr(eng, "step", broken_step))  # fault injection
        streamed = client.post("/v1/completions", json={"model": "t", "prompt": "x",
                                                        "max_tokens": 5, "stream": True})
        assert streamed.status_code == 200  # the stream had started
        events = [line[6:] for line in streamed.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["code"] == "service_unavailable" and error["status"] == 503
        assert "injected failure" in error["message"]

        health = client.get("/health")
        assert health.status_code == 503
        assert set(health.json()["error"]) == {"message", "type", "param", "code"}
        refused = client.post("/v1/chat/completions", json={
            "model": "t", "messages": [{"role": "user", "content": "hi"}]})
        assert refused.status_code == 503
        metrics = client.get("/metrics").text
        assert "modelhive:engine_healthy 0.0" in metrics
