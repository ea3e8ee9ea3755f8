"""--api-key (here through MODELHIVE_API_KEY): 401 without it or with a wrong one; /health stays open."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.server.conftest import start_server

KEY = "sk-test-0123456789"


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("auth"), env={"MODELHIVE_API_KEY": KEY})
    yield srv
    assert srv.stop() == 0, srv.log()[-3000:]


def test_right_key_is_served(keyed):
    for port in (keyed.port, keyed.model_port):
        r = keyed.client(port, api_key=KEY).completions.create(model="tiny-llama", prompt="hi",
                                                               max_tokens=2)
        assert r.usage.completion_tokens >= 1


@pytest.mark.parametrize("port_kind", ["main", "model"])
def test_missing_or_wrong_key_is_401(keyed, port_kind):
    port = keyed.port if port_kind == "main" else keyed.model_port
    with pytest.raises(openai.AuthenticationError) as info:
        keyed.client(port, api_key="sk-wrong").models.list()
    assert info.value.code == "invalid_api_key"
    for path in ("/v1/models", "/metrics", "/tokenize"):
        response = httpx.request("GET" if path != "/tokenize" else "POST", keyed.url(port) + path,
                                 json={"prompt": "x"})
        assert response.status_code == 401, path
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    bigger = httpx.post(keyed.url(port) + "/v1/completions", content=b"x" * (9 * 2**20))
    assert bigger.status_code == 401  # the key is checked before the body is read


def test_health_needs_no_key(keyed):
    assert httpx.get(keyed.url() + "/health").status_code == 200
