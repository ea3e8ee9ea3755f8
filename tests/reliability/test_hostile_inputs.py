"""Item 2: hostile inputs against a real `modelhive serve` subprocess (two tiny presets, CPU).

Each case gets a precise 4xx in OpenAI's error shape (status, and the ``param`` or ``code`` that
says what to fix), and after every case an ordinary request to the other model still gets 200.
The chat template (``--chat-template``) is hostile too: asked the right way it tries to include a
file, reach ``os`` through ``__globals__``, loop ~forever or recurse; each such request gets a 400
within the render time limit and the server carries on.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from modelhive.models.chat_template import RENDER_TIMEOUT_S
from tests.reliability.conftest import assert_openai_error, wait_pool_free
from tests.server.conftest import start_server

CONFIG = """\
memory: 128MiB
device: cpu
models:
  - name: tiny-llama
    source: preset:tiny-llama
    max_model_len: 256
    max_num_seqs: 8
  - name: tiny-qwen2
    source: preset:tiny-qwen2
    max_model_len: 256
    max_num_seqs: 8
"""

#: what the last message says picks the template's behaviour; anything else renders normally
HOSTILE_TEMPLATE = """\
{%- macro down(n) -%}{{ down(n + 1) }}{%- endmacro -%}
{%- set last = messages[-1]['content'] -%}
{%- if last == 'read-file' -%}{% include '/etc/passwd' %}
{%- elif last == 'import-file' -%}{% import '/etc/hostname' as host %}{{ host }}
{%- elif last == 'escape' -%}{{ cycler.__init__.__globals__.os.popen('id').read() }}
{%- elif last == 'subclasses' -%}{{ ''.__class__.__mro__[1].__subclasses__() }}
{%- elif last == 'loop' -%}
{%- for i in range(100000) %}{% for j in range(100000) %}{{ '' }}{% endfor %}{% endfor -%}
{%- elif last == 'recurse' -%}{{ down(0) }}
{%- else -%}
{%- for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}<|assistant|>
{%- endif -%}
"""

JSON = {"content-type": "application/json"}
NESTED_LISTS = b"[" * 100_000 + b"]" * 100_000
NESTED_OBJECTS = b'{"a":' * 100_000 + b"1" + b"}" * 100_000


def chat(content, **extra) -> dict:
    return {"model": "tiny-llama", "messages": [{"role": "user", "content": content}],
            "max_tokens": 4, **extra}


def completion(**extra) -> dict:
    return {"model": "tiny-llama", "prompt": "hi", "max_tokens": 4, **extra}


def raw(text: bytes | str) -> bytes:
    return text.encode() if isinstance(text, str) else text


# (case id, path, body: dict (sent as JSON) or bytes (sent as is), status, expected param or code)
CASES = [
    ("truncated-json", "completions", b'{"model": "tiny-llama", "prompt": "hi', 400, "invalid_json"),
    ("single-quoted-json", "completions", b"{'model': 'tiny-llama'}", 400, "invalid_json"),
    ("trailing-garbage", "completions", raw(json.dumps(completion())) + b"}}", 400, "invalid_json"),
    ("empty-body", "completions", b"", 400, "missing"),
    ("json-null-body", "completions", b"null", 400, "model_attributes_type"),
    ("json-array-body", "chat/completions", b"[1, 2, 3]", 400, "model_attributes_type"),
    ("prompt-is-number", "completions", completion(prompt=5), 400, "prompt"),
    ("prompt-is-object", "completions", completion(prompt={"a": 1}), 400, "prompt"),
    ("max-tokens-is-string", "completions", completion(max_tokens="ten"), 400, "max_tokens"),
    ("messages-is-string", "chat/completions", {"model": "tiny-llama", "messages": "hi"}, 400,
     "messages"),
    ("stream-is-string", "completions", completion(stream="yes please"), 400, "stream"),
    ("null-prompt", "completions", completion(prompt=None), 400, "prompt"),
    ("null-messages", "chat/completions", {"model": "tiny-llama", "messages": None}, 400,
     "messages"),
    ("null-message", "chat/completions", {"model": "tiny-llama", "messages": [None]}, 400,
     "messages[0]"),
    ("null-role", "chat/completions",
     {"model": "tiny-llama", "messages": [{"role": None, "content": "x"}]}, 400, "messages[0].role"),
    ("huge-max-tokens-float", "completions", raw('{"model": "tiny-llama", "prompt": "x", "max_tokens": 1e400}'), 400,
     "max_tokens"),
    ("huge-n", "completions", completion(n=10**30), 400, "n"),
    ("huge-token-id", "completions", completion(prompt=[10**30]), 400, "prompt"),
    ("huge-temperature-overflow", "completions", raw('{"model": "tiny-llama", "prompt": "x", "temperature": 1e999}'), 400,
     "temperature"),
    ("negative-temperature", "completions", completion(temperature=-0.5), 400, "temperature"),
    ("nan-temperature", "completions", raw('{"model": "tiny-llama", "prompt": "x", "temperature": NaN}'), 400,
     "temperature"),
    ("infinite-temperature", "chat/completions",
     raw('{"model": "tiny-llama", "messages": [{"role": "user", "content": "x"}], "temperature": -Infinity}'), 400,
     "temperature"),
    ("nan-temperature-stream", "completions",
     raw('{"model": "tiny-llama", "prompt": "x", "temperature": NaN, "stream": true}'), 400, "temperature"),
    ("n-far-past-limit", "completions", completion(n=1000), 400, "n"),
    ("max-tokens-far-past-limit", "completions", completion(max_tokens=10**9), 400, "max_tokens"),
    ("max-completion-tokens-far-past-limit", "chat/completions",
     chat("hi", max_completion_tokens=10**9), 400, "max_completion_tokens"),
    ("prompt-past-max-model-len", "completions", completion(prompt="word " * 2000), 400, "prompt"),
    ("token-prompt-past-max-model-len", "completions", completion(prompt=[7] * 5000), 400,
     "prompt"),
    ("messages-past-max-model-len", "chat/completions", chat("word " * 2000), 400, "messages"),
    ("invalid-utf8", "completions", b'{"model": "tiny-llama", "prompt": "\xff\xfe\xc3("}', 400,
     "invalid_json"),
    ("lone-surrogate", "completions", raw('{"model": "tiny-llama", "prompt": "\\ud800 x"}'), 400, "prompt"),
    ("lone-surrogate-in-message", "chat/completions",
     raw('{"model": "tiny-llama", "messages": [{"role": "user", "content": "\\udfff"}]}'), 400, "messages[0].content"),
    ("empty-messages", "chat/completions", {"model": "tiny-llama", "messages": []}, 400,
     "messages"),
    ("empty-prompt", "completions", completion(prompt=""), 400, "prompt"),
    ("message-without-role", "chat/completions",
     {"model": "tiny-llama", "messages": [{"content": "x"}]}, 400, "messages[0].role"),
    ("unknown-role", "chat/completions",
     {"model": "tiny-llama", "messages": [{"role": "function", "content": "x"}]}, 400,
     "messages[0].role"),
    ("ten-megabyte-body", "completions", raw(json.dumps(completion(prompt="x" * 10_000_000))), 413,
     "request_too_large"),
    ("nested-lists-100k", "completions", NESTED_LISTS, 400, "invalid_json"),
    ("nested-objects-100k", "chat/completions", NESTED_OBJECTS, 400, "invalid_json"),
    ("nested-prompt-100k", "completions", b'{"prompt": ' + NESTED_LISTS + b"}", 400,
     "invalid_json"),
    ("nested-prompt-500", "completions", b'{"prompt": ' + b"[" * 500 + b"]" * 500 + b"}", 400,
     "prompt"),
    ("template-reads-file", "chat/completions", chat("read-file"), 400, "messages"),
    ("template-imports-file", "chat/completions", chat("import-file"), 400, "messages"),
    ("template-reaches-os", "chat/completions", chat("escape"), 400, "messages"),
    ("template-lists-subclasses", "chat/completions", chat("subclasses"), 400, "messages"),
    ("template-loops-forever", "chat/completions", chat("loop"), 400, "messages"),
    ("template-recurses", "chat/completions", chat("recurse"), 400, "messages"),
    ("template-via-tokenize", "/tokenize",
     {"model": "tiny-qwen2", "messages": [{"role": "user", "content": "loop"}]}, 400, "messages"),
]


@pytest.fixture(scope="module")
def hostile_server(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("hostile")
    (workdir / "hive.yaml").write_text(CONFIG)
    (workdir / "hostile.jinja").write_text(HOSTILE_TEMPLATE)
    # default --max-request-bytes (8 MiB): the 10 MB case must hit the real default cap
    srv = start_server(workdir, str(workdir / "hive.yaml"), "--chat-template",
                       str(workdir / "hostile.jinja"), use_config=False)
    yield srv
    assert srv.stop() == 0, srv.log()[-3000:]


def _ordinary_request_works(srv) -> None:
    r = httpx.post(srv.url() + "/v1/completions", json={"model": "tiny-qwen2", "prompt": "ok",
                                                        "max_tokens": 2}, timeout=30)
    assert r.status_code == 200, r.text[:300]
    assert r.json()["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize("case_id,path,body,status,expected", CASES, ids=[c[0] for c in CASES])
def test_hostile_input_gets_precise_4xx(hostile_server, case_id, path, body, status, expected):
    url = hostile_server.url() + (path if path.startswith("/") else f"/v1/{path}")
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    started = time.monotonic()
    response = httpx.post(url, content=content, headers=JSON, timeout=60)
    elapsed = time.monotonic() - started
    error = assert_openai_error(response, status)
    assert expected in (error["param"], error["code"]), (case_id, error)
    if case_id.startswith("template-"):
        assert elapsed < RENDER_TIMEOUT_S + 3, f"{case_id} took {elapsed:.1f} s"
        assert "root:" not in error["message"] and "uid=" not in error["message"]
    _ordinary_request_works(hostile_server)


def test_others_are_served_while_hostile_requests_arrive(hostile_server):
    """A long stream runs while the hostile list is sent again from 4 threads: it finishes whole,
    every hostile request still gets its 4xx, and the pool is free afterwards."""
    srv = hostile_server
    events: list[str] = []

    def long_stream() -> None:
        body = {"model": "tiny-qwen2", "prompt": "steady", "max_tokens": 200, "stream": True,
                "ignore_eos": True, "temperature": 0}
        with httpx.stream("POST", srv.url() + "/v1/completions", json=body, timeout=120) as r:
            assert r.status_code == 200
            events.extend(line for line in r.iter_lines() if line.startswith("data: "))

    statuses: list[tuple[str, int]] = []

    def barrage(cases) -> None:
        with httpx.Client(timeout=60) as client:
            for case_id, path, body, _status, _ in cases:
                url = srv.url() + (path if path.startswith("/") else f"/v1/{path}")
                content = body if isinstance(body, bytes) else json.dumps(body).encode()
                statuses.append((case_id, client.post(url, content=content,
                                                      headers=JSON).status_code))

    fast = [c for c in CASES if c[0] != "template-loops-forever" and c[0] != "template-via-tokenize"]
    threads = [threading.Thread(target=long_stream)]
    threads += [threading.Thread(target=barrage, args=(fast[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    expected = {c[0]: c[3] for c in CASES}
    assert len(statuses) == len(fast)
    assert all(code == expected[case_id] for case_id, code in statuses), statuses
    assert events[-1] == "data: [DONE]"
    last = json.loads(events[-2][6:])
    assert last["choices"][0]["finish_reason"] == "length"
    wait_pool_free(srv.url())
    assert httpx.get(srv.url() + "/health").status_code == 200


def test_a_slow_template_does_not_stall_other_requests(hostile_server):
    """Templates render on a worker thread: while one runs to its time limit, /health is answered
    (on the event loop it could only answer once the render ended)."""
    srv = hostile_server
    url = srv.url() + "/v1/chat/completions"
    done: dict[str, float] = {}

    def slow() -> None:
        response = httpx.post(url, json=chat("loop"), timeout=60)
        done["slow"] = time.monotonic()
        assert_openai_error(response, 400)

    thread = threading.Thread(target=slow)
    started = time.monotonic()
    thread.start()
    time.sleep(0.3)  # the render is running now
    assert httpx.get(srv.url() + "/health", timeout=30).status_code == 200
    done["health"] = time.monotonic()
    thread.join()
    assert done["slow"] - started >= 0.8 * RENDER_TIMEOUT_S  # it did run to its limit
    assert done["health"] < done["slow"], "health waited for the template"
    _ordinary_request_works(srv)
