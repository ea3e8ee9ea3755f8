"""Item 5: faults. A corrupt or missing model file: `serve` refuses to start with one line and exit 1,
or with --skip-failed-models serves the others and reports the failed one in /health and
/v1/models. An exception in one model's forward fails only that model's in-flight requests (500 in
OpenAI's shape, or an error event for a stream); the model recovers on the next request, and after
3 consecutive failures it is marked unhealthy (503 with Retry-After) while the other model serves.
SIGTERM draining is tests/server/test_lifecycle.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from modelhive.server.app import create_app
from tests.reliability.conftest import assert_openai_error, running_engine, tiny_specs
from tests.server.conftest import free_port, start_server
from tests.unit.test_sources import _write_gguf, _write_hf_dir


@pytest.fixture(scope="module")
def broken_files(tmp_path_factory) -> dict[str, Path]:
    """A good tiny GGUF, and broken copies: header cut, data cut in half, random bytes, missing."""
    folder = tmp_path_factory.mktemp("broken")
    good = folder / "good.gguf"
    _write_gguf(good, "tiny-llama")
    data = good.read_bytes()
    files = {"header-cut": data[:300], "data-cut": data[:len(data) // 2],
             "twelve-bytes": data[:12], "not-gguf": b"\x00garbage" * 40}
    out = {name: folder / f"{name}.gguf" for name in files}
    for name, content in files.items():
        out[name].write_bytes(content)
    out["missing"] = folder / "missing.gguf"
    return out


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MODELHIVE_CACHE_DIR", str(tmp_path / "cache"))


@pytest.mark.parametrize("kind", ["header-cut", "data-cut", "missing"])
def test_broken_model_file_refuses_to_start_with_one_line(broken_files, kind, tmp_path):
    cmd = [sys.executable, "-m", "modelhive", "serve", "--model", "preset:tiny-qwen2", "--model",
           str(broken_files[kind]), "--device", "cpu", "--memory", "64MiB",
           "--port", str(free_port()), "--no-access-log"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    lines = [line for line in done.stderr.replace("\r", "\n").splitlines()
             if line.strip() and not line.startswith("loading models")]
    assert len(lines) == 1, lines  # the progress bar aside: one line, the reason
    assert lines[0].startswith("modelhive serve: error: ")
    assert str(broken_files[kind]) in lines[0]  # names the file (the operator's own path)
    assert "serving" not in done.stdout  # never started listening


def test_skip_failed_models_serves_the_others_and_reports(broken_files, tmp_path):
    bad = broken_files["data-cut"]
    srv = start_server(tmp_path, "--model", "preset:tiny-qwen2", "--model", str(bad),
                       "--served-model-name", "qwen", "--served-model-name", "broken",
                       "--device", "cpu", "--memory", "64MiB", "--skip-failed-models",
                       use_config=False)
    try:
        health = httpx.get(srv.url() + "/health").json()
        assert health["status"] == "degraded" and health["models"] == ["qwen"]
        [failed] = health["failed_models"]
        assert failed["id"] == "broken" and "corrupt" in failed["error"]
        models = httpx.get(srv.url() + "/v1/models").json()
        assert [m["id"] for m in models["data"]] == ["qwen"]
        assert models["failed"] == health["failed_models"]
        for body in (health, models):  # no file path reaches a client
            assert str(bad.parent) not in json.dumps(body)
        refused = httpx.post(srv.url() + "/v1/completions",
                             json={"model": "broken", "prompt": "x", "max_tokens": 2})
        error = assert_openai_error(refused, 503)
        assert error["code"] == "model_not_loaded" and str(bad.parent) not in error["message"]
        ok = httpx.post(srv.url() + "/v1/completions", json={"model": "qwen", "prompt": "x",
                                                            "max_tokens": 3, "ignore_eos": True})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
        log = srv.log()
        assert "WARNING: model broken is not served" in log and "Traceback" not in log
        # the plan and the engine were made without it: no series of it at all
        metrics = httpx.get(srv.url() + "/metrics").text
        assert 'model_name="qwen"' in metrics and 'model_name="broken"' not in metrics
    finally:
        assert srv.stop() == 0, srv.log()[-3000:]


def test_skip_failed_models_covers_a_broken_tokenizer(tmp_path):
    """Weights that load but a tokenizer file that does not: skipped like broken weights."""
    hf = tmp_path / "hf-broken-tokenizer"
    hf.mkdir()
    _write_hf_dir(hf, "tiny-qwen2")
    (hf / "tokenizer.json").write_text("{ this is not json")
    (hf / "tokenizer_config.json").write_text("{}")
    srv = start_server(tmp_path, "--model", "preset:tiny-llama", "--model", str(hf),
                       "--served-model-name", "llama", "--served-model-name", "broken",
                       "--device", "cpu", "--memory", "64MiB", "--skip-failed-models",
                       use_config=False)
    try:
        health = httpx.get(srv.url() + "/health").json()
        assert health["status"] == "degraded" and health["models"] == ["llama"]
        [failed] = health["failed_models"]
        assert failed["id"] == "broken" and str(hf) not in failed["error"]
        ok = httpx.post(srv.url() + "/v1/completions", json={"model": "llama", "prompt": "x",
                                                            "max_tokens": 2, "ignore_eos": True})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2
        assert "Traceback" not in srv.log()
    finally:
        assert srv.stop() == 0, srv.log()[-3000:]


def test_skip_failed_models_still_refuses_when_nothing_loads(broken_files):
    cmd = [sys.executable, "-m", "modelhive", "serve", "--model", str(broken_files["missing"]),
           "--device", "cpu", "--memory", "64MiB", "--port", str(free_port()),
           "--skip-failed-models"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.rstrip().splitlines()[-1].startswith("modelhive serve: error: ")


class ForwardFault:
    """Wraps one runner's ``execute``: raises while ``armed`` (counts the raises)."""

    def __init__(self, runner):
        self.runner = runner
        self.real = runner.execute
        self.armed = False
        self.raised = 0
        self.entered = threading.Event()

    def __call__(self, batch):
        self.entered.set()
        if self.armed:
            self.raised += 1
            raise RuntimeError("injected forward failure")
        return self.real(batch)


def test_forward_exception_fails_only_that_models_requests_then_recovers():
    specs = tiny_specs(max_model_len=256, max_num_seqs=4)
    with running_engine(specs) as engine:
        fault = ForwardFault(engine.engine.models["tiny-llama"].runner)
        engine.call(lambda e: setattr(e.models["tiny-llama"].runner, "execute", fault))
        with TestClient(create_app(engine), raise_server_exceptions=False) as client:
            def completion(model: str, stream: bool = False, max_tokens: int = 8):
                return client.post("/v1/completions", json={
                    "model": model, "prompt": "fault", "max_tokens": max_tokens,
                    "ignore_eos": True, "stream": stream})

            assert completion("tiny-llama").status_code == 200
            # a long qwen stream is in flight while llama's forward fails
            results: dict[str, httpx.Response] = {}
            qwen = threading.Thread(target=lambda: results.update(
                qwen=completion("tiny-qwen2", stream=True, max_tokens=200)))
            qwen.start()
            fault.armed = True
            failed = completion("tiny-llama")
            error = assert_openai_error(failed, 500)
            assert error["code"] == "generation_failed" and error["type"] == "internal_server_error"
            assert "injected forward failure" in error["message"]
            streamed = completion("tiny-llama", stream=True)
            assert streamed.status_code == 200  # the stream had started
            events = [line[6:] for line in streamed.text.splitlines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]"
            assert json.loads(events[-2])["error"]["status"] == 500
            qwen.join(60)
            qwen_events = [line[6:] for line in results["qwen"].text.splitlines()
                           if line.startswith("data: ")]
            assert '"error"' not in results["qwen"].text
            assert json.loads(qwen_events[-2])["choices"][0]["finish_reason"] == "length"
            assert fault.raised == 2
            # the model recovers: the next request works and resets its failure count
            fault.armed = False
            assert completion("tiny-llama").status_code == 200
            assert engine.engine.models["tiny-llama"].consecutive_failures == 0
            assert engine.engine.models["tiny-llama"].healthy

            # three failures in a row: marked unhealthy, refused with 503 + Retry-After
            fault.armed = True
            for _ in range(3):
                assert completion("tiny-llama").status_code == 500
            fault.armed = False
            refused = completion("tiny-llama")
            error = assert_openai_error(refused, 503)
            assert refused.headers["retry-after"].isdigit()
            assert "unhealthy" in error["message"]
            assert completion("tiny-qwen2").status_code == 200  # the other model serves
            assert client.get("/health").status_code == 200  # the engine loop itself is fine
