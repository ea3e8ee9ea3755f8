"""Item 6: security. tests/server/test_auth.py covers MODELHIVE_API_KEY on a few paths; here:
--api-key (the flag) on EVERY route of both the main and a per-model port (from the app's own route
table, /openapi.json and /docs included), /health open; the key compare is hmac.compare_digest
(constant time) on the exact bytes; the default bind is 127.0.0.1 (read from /proc/net/tcp of
the running server); the body cap applies before parsing; no file path in any error message.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest

from modelhive.server import middleware
from modelhive.server.middleware import APIKeyMiddleware
from modelhive.server.state import ServedConfig
from tests.reliability.conftest import assert_openai_error
from tests.server.conftest import start_server

KEY = "sk-reliability-9f8e7d6c5b4a"
ROUTES = [("GET", "/v1/models"), ("GET", "/v1/models/tiny-llama"), ("POST", "/v1/completions"),
          ("POST", "/v1/chat/completions"), ("POST", "/tokenize"), ("POST", "/detokenize"),
          ("GET", "/version"), ("GET", "/metrics"), ("GET", "/v1/hive/ps"), ("GET", "/openapi.json"), ("GET", "/docs"),
          ("GET", "/redoc"), ("GET", "/docs/oauth2-redirect"), ("GET", "/nonexistent")]


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    # the flag, and a different key in the environment: the flag wins
    srv = start_server(tmp_path_factory.mktemp("keyed"), "--api-key", KEY,
                       env={"MODELHIVE_API_KEY": "sk-from-env-not-used"})
    yield srv
    assert srv.stop() == 0, srv.log()[-3000:]


def test_route_table_is_covered():
    """Every route the app mounts is in ROUTES, so a new endpoint cannot skip this test."""
    from modelhive.server.app import create_app
    from tests.reliability.conftest import running_engine, tiny_specs

    with running_engine(tiny_specs(names=("tiny-llama",))) as engine:
        app = create_app(engine, api_key=KEY)
        mounted = {(m, r.path.replace("{name:path}", "tiny-llama")) for r in app.routes
                   for m in getattr(r, "methods", ()) if m != "HEAD"}
    assert mounted - {("GET", "/health")} <= set(ROUTES), mounted - set(ROUTES)


@pytest.mark.parametrize("port_kind", ["main", "model"])
def test_api_key_flag_guards_every_route_but_health(keyed, port_kind):
    port = keyed.port if port_kind == "main" else keyed.model_port
    base = keyed.url(port)
    wrong = [{}, {"Authorization": "Bearer sk-from-env-not-used"},
             {"Authorization": f"Bearer {KEY[:-1]}"}, {"Authorization": f"Bearer {KEY}x"},
             {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}, {"X-API-Key": KEY}]
    body = {"model": "tiny-llama", "prompt": "x", "max_tokens": 1,
            "messages": [{"role": "user", "content": "x"}], "tokens": [1]}
    for method, path in ROUTES:
        for headers in wrong:
            r = httpx.request(method, base + path, json=body, headers=headers, timeout=30)
            error = assert_openai_error(r, 401)
            assert error["code"] == "invalid_api_key", (path, headers)
        right = httpx.request(method, base + path, json=body,
                              headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
        # the key lets it through to the route (which may still dislike the shared test body)
        assert right.status_code not in (401, 500), (path, right.status_code, right.text[:200])
    assert httpx.get(base + "/health").status_code == 200


def test_key_compare_is_constant_time(monkeypatch):
    """The middleware decides with hmac.compare_digest on the whole header, nothing else."""
    import asyncio

    calls: list[tuple[bytes, bytes]] = []
    real = middleware.hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(middleware.hmac, "compare_digest", spy)
    reached: list[str] = []

    async def app(scope, receive, send):
        reached.append(scope["path"])

    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b""}

    guard = APIKeyMiddleware(app, KEY)
    for given, allowed in ((f"Bearer {KEY}", True), (f"Bearer {KEY[:-1]}", False), ("", False)):
        headers = [(b"authorization", given.encode())] if given else []
        scope = {"type": "http", "path": "/v1/models", "headers": headers, "method": "GET"}
        asyncio.run(guard(scope, receive, send))
        assert calls[-1] == (given.encode(), f"Bearer {KEY}".encode())
        assert (reached[-1:] == ["/v1/models"]) is allowed
        reached.clear()
    assert len(calls) == 3
    source = Path(middleware.__file__).read_text()
    assert "self.expected ==" not in source and "== self.expected" not in source


def test_default_bind_is_loopback(server):
    """No --host and no host in the config: ServedConfig and the real sockets use 127.0.0.1."""
    assert ServedConfig().host == "127.0.0.1"
    listening = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, port = local.split(":")
            if state == "0A" and int(port, 16) in (server.port, server.model_port):
                listening.add((address, int(port, 16)))
    assert {port for _, port in listening} == {server.port, server.model_port}
    assert {address for address, _ in listening} == {"0100007F"}, listening  # 127.0.0.1 only


def test_body_cap_answers_before_parsing(server):
    """The fixture's cap is 64 KiB: a body one byte over is refused, one at the cap is parsed."""
    body = {"model": "tiny-llama", "prompt": "x", "max_tokens": 1}
    encoded = json.dumps(body).encode()
    at_cap = encoded[:-1] + b" " * (65536 - len(encoded)) + b"}"
    assert len(at_cap) == 65536
    ok = httpx.post(server.url() + "/v1/completions", content=at_cap,
                    headers={"content-type": "application/json"})
    assert ok.status_code == 200, ok.text
    over = httpx.post(server.url() + "/v1/completions", content=at_cap + b" ",
                      headers={"content-type": "application/json"})
    assert assert_openai_error(over, 413)["code"] == "request_too_large"


def test_no_file_path_in_error_messages(server, tmp_path):
    """Errors that involve names or files echo only what the client sent, never server paths."""
    secrets = [str(Path.cwd()), str(Path.home()), "site-packages", ".py", str(tmp_path.parent),
               "/usr/", "/work/", "/tmp/"]
    requests = [
        ("POST", "/v1/completions", {"model": "../../../etc/passwd", "prompt": "x"}),
        ("GET", "/v1/models/%2Fetc%2Fshadow", None),
        ("POST", "/v1/completions", {"model": "tiny-llama", "prompt": [10**9]}),
        ("POST", "/v1/chat/completions", {"model": "tiny-llama", "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc"}}]}]}),
        ("POST", "/v1/completions", {"model": "tiny-llama", "prompt": "x", "max_tokens": 10**6}),
        ("POST", "/detokenize", {"model": "tiny-qwen2", "tokens": [-5]}),
        ("GET", "/static/../../etc/passwd", None),
    ]
    for method, path, body in requests:
        r = httpx.request(method, server.url() + path, json=body, timeout=30)
        error = assert_openai_error(r)
        message = error["message"]
        for secret in secrets:
            assert secret not in message, (path, message)
