"""The OpenAI-compatible API against a real `modelhive serve` subprocess, official `openai` client."""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import openai
import pytest

MODELS = ("tiny-llama", "tiny-qwen2")
CHAT = [{"role": "user", "content": "Tell me about bees."}]


def tokenize(server, **body) -> list[int]:
    response = httpx.post(server.url() + "/tokenize", json=body, timeout=30)
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["count"] == len(data["tokens"])
    return data["tokens"]


def test_models_lists_both(server):
    ids = sorted(m.id for m in server.client().models.list().data)
    assert ids == sorted(MODELS)
    assert [m.id for m in server.client(server.model_port).models.list().data] == ["tiny-llama"]


def test_chat_and_completion_for_two_models_concurrently(server):
    async def one(model: str, kind: str) -> tuple[str, str, str | None, int]:
        client = server.async_client()
        if kind == "chat":
            r = await client.chat.completions.create(model=model, messages=CHAT, max_tokens=12,
                                                     extra_body={"ignore_eos": True})
            text = r.choices[0].message.content
        else:
            r = await client.completions.create(model=model, prompt="Once upon a", max_tokens=12,
                                                extra_body={"ignore_eos": True})
            text = r.choices[0].text
        return r.model, kind, r.choices[0].finish_reason, r.usage.completion_tokens, text

    async def all_of_them():
        jobs = [one(m, k) for m in MODELS for k in ("chat", "completion") for _ in range(3)]
        return await asyncio.gather(*jobs)

    results = asyncio.run(all_of_them())
    assert len(results) == 12
    assert sorted({(r[0], r[1]) for r in results}) == sorted(
        (m, k) for m in MODELS for k in ("chat", "completion"))
    for _model, _kind, finish_reason, completion_tokens, text in results:
        assert finish_reason == "length" and completion_tokens == 12 and text


@pytest.mark.parametrize("model", MODELS)
def test_greedy_stream_equals_non_stream(server, model):
    client = server.client()
    common = dict(model=model, max_tokens=40, temperature=0)
    full = client.completions.create(prompt="The quick brown fox", **common)
    pieces = [c.choices[0].text for c in
              client.completions.create(prompt="The quick brown fox", stream=True, **common)
              if c.choices]
    assert "".join(pieces) == full.choices[0].text and len(pieces) > 1
    chat = client.chat.completions.create(messages=CHAT, **common)
    streamed = [c.choices[0].delta.content or "" for c in
                client.chat.completions.create(messages=CHAT, stream=True, **common)
                if c.choices]
    assert "".join(streamed) == chat.choices[0].message.content


def test_many_concurrent_streams_equal_their_non_streamed_replies(server):
    """48 streams at once (a stream whose consumer lags gets several tokens in one write):
    each streamed reply, chat and completion, is its non-streamed greedy reply, in order."""
    prompts = [f"Story {i}: once upon a time" for i in range(24)]
    common = dict(model="tiny-llama", max_tokens=24, temperature=0,
                  extra_body={"ignore_eos": True})

    async def streamed(client, i: int) -> tuple[str, str, int]:
        if i % 2:
            chunks = await client.chat.completions.create(
                messages=[{"role": "user", "content": prompts[i // 2]}], stream=True,
                stream_options={"include_usage": True}, **common)
            parts, reason, usage = [], None, None
            async for c in chunks:
                if c.choices:
                    parts.append(c.choices[0].delta.content or "")
                    reason = c.choices[0].finish_reason or reason
                usage = c.usage or usage
        else:
            chunks = await client.completions.create(
                prompt=prompts[i // 2], stream=True, stream_options={"include_usage": True},
                **common)
            parts, reason, usage = [], None, None
            async for c in chunks:
                if c.choices:
                    parts.append(c.choices[0].text)
                    reason = c.choices[0].finish_reason or reason
                usage = c.usage or usage
        return "".join(parts), reason, usage.completion_tokens

    async def all_streams():
        client = server.async_client()
        return await asyncio.gather(*(streamed(client, i) for i in range(48)))

    results = asyncio.run(all_streams())
    client = server.client()
    for i, (text, reason, tokens) in enumerate(results):
        if i % 2:
            full = client.chat.completions.create(
                messages=[{"role": "user", "content": prompts[i // 2]}], **common)
            expected = full.choices[0].message.content
        else:
            full = client.completions.create(prompt=prompts[i // 2], **common)
            expected = full.choices[0].text
        assert (text, reason, tokens) == (expected, "length", 24), i


@pytest.mark.parametrize("model", MODELS)
def test_usage_counts_are_real_token_counts(server, model):
    client = server.client()
    prompt = "Count these tokens, please: 1 2 3"
    r = client.completions.create(model=model, prompt=prompt, max_tokens=9, logprobs=0,
                                  extra_body={"ignore_eos": True})
    assert r.usage.prompt_tokens == len(tokenize(server, model=model, prompt=prompt))
    assert r.usage.completion_tokens == 9 == len(r.choices[0].logprobs.tokens)
    assert r.usage.total_tokens == r.usage.prompt_tokens + 9
    c = client.chat.completions.create(model=model, messages=CHAT, max_completion_tokens=7,
                                       logprobs=True, top_logprobs=2,
                                       extra_body={"ignore_eos": True})
    assert c.usage.prompt_tokens == len(tokenize(server, model=model, messages=CHAT))
    assert c.usage.completion_tokens == 7 == len(c.choices[0].logprobs.content)
    assert all(len(t.top_logprobs) == 2 for t in c.choices[0].logprobs.content)


@pytest.mark.parametrize("model", MODELS)
def test_echo_with_logprobs_scores_the_prompt(server, model):
    """lm-eval's loglikelihood request (token ids, ``echo``, ``logprobs``, ``max_tokens`` 1): the
    prompt's tokens come first, the first without a logprob, each other one scored given the
    tokens before it: the same distribution a completion of that prefix reports."""
    client = server.client()
    ids = tokenize(server, model=model, prompt="The bees fly over the quiet river at dawn")
    r = client.completions.create(model=model, prompt=ids, max_tokens=1, temperature=0,
                                  logprobs=2, echo=True)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(ids) + 1 == len(lp.token_logprobs) == len(lp.top_logprobs)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(isinstance(v, float) and v <= 0 for v in lp.token_logprobs[1:])
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 1
    for i in (1, len(ids) // 2, len(ids) - 1):
        prefix = client.completions.create(model=model, prompt=ids[:i], max_tokens=1,
                                           temperature=0, logprobs=2)
        want = prefix.choices[0].logprobs.top_logprobs[0]
        got = lp.top_logprobs[i]
        assert set(got) == set(want)
        assert all(abs(got[t] - want[t]) < 1e-4 for t in want)
    # the generated token is the greedy one after the whole prompt
    plain = client.completions.create(model=model, prompt=ids, max_tokens=1, temperature=0)
    assert r.choices[0].text.endswith(plain.choices[0].text)
    assert len(r.choices[0].text) > len(plain.choices[0].text)

    # streamed: the prompt (and its logprobs) with the first chunk, the same text and tokens
    chunks = [c for c in client.completions.create(model=model, prompt=ids, max_tokens=3,
                                                   temperature=0, logprobs=2, echo=True,
                                                   stream=True) if c.choices]
    full = client.completions.create(model=model, prompt=ids, max_tokens=3, temperature=0,
                                     logprobs=2, echo=True).choices[0]
    assert "".join(c.choices[0].text for c in chunks) == full.text
    assert [t for c in chunks for t in c.choices[0].logprobs.tokens] == full.logprobs.tokens
    assert [o for c in chunks for o in c.choices[0].logprobs.text_offset] == \
        full.logprobs.text_offset
    assert len(chunks[0].choices[0].logprobs.tokens) >= len(ids)


def test_echo_with_max_tokens_0_returns_the_prompt_alone(server):
    """lm-eval's older loglikelihood request (``max_tokens`` 0), as vLLM answers it."""
    client = server.client()
    ids = tokenize(server, model="tiny-llama", prompt="Bees hum in the warm afternoon")
    args = dict(model="tiny-llama", prompt=ids, max_tokens=0, echo=True, logprobs=1)
    r = client.completions.create(**args)
    full = client.completions.create(**{**args, "max_tokens": 1})
    c, f = r.choices[0], full.choices[0]
    assert c.finish_reason == "length" and r.usage.completion_tokens == 0
    assert len(c.logprobs.tokens) == len(ids) and c.logprobs.tokens == f.logprobs.tokens[:-1]
    assert c.logprobs.token_logprobs == f.logprobs.token_logprobs[:-1]
    assert f.text.startswith(c.text) and len(f.text) > len(c.text)
    chunks = [x for x in client.completions.create(**args, stream=True,
                                                   stream_options={"include_usage": True})]
    assert [x.choices[0].text for x in chunks if x.choices] == [c.text]
    assert chunks[0].choices[0].logprobs.token_logprobs == c.logprobs.token_logprobs
    assert chunks[-1].usage.completion_tokens == 0
    plain = httpx.post(server.url() + "/v1/completions", timeout=30,
                       json={"model": "tiny-llama", "prompt": "x", "max_tokens": 0})
    assert plain.status_code == 400 and plain.json()["error"]["param"] == "max_tokens"


def test_echo_prepends_each_prompt(server):
    client = server.client()
    r = client.completions.create(model="tiny-qwen2", prompt=["Hello bees", "Quiet river"],
                                  max_tokens=4, temperature=0, n=2, echo=True,
                                  extra_body={"ignore_eos": True})
    texts = {c.index: c.text for c in r.choices}
    assert [texts[i][:10] for i in range(4)] == ["Hello bees"] * 2 + ["Quiet rive"] * 2
    assert texts[2].startswith("Quiet river") and len(texts[0]) > len("Hello bees")
    assert r.choices[0].logprobs is None


def test_include_usage_adds_final_chunk(server):
    client = server.client()
    args = dict(model="tiny-qwen2", messages=CHAT, max_tokens=5, temperature=0,
                extra_body={"ignore_eos": True})
    chunks = list(client.chat.completions.create(stream=True,
                                                 stream_options={"include_usage": True}, **args))
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert all(c.usage is None for c in chunks[:-1])
    expected = client.chat.completions.create(**args).usage
    assert chunks[-1].usage.model_dump() == expected.model_dump()
    plain = list(client.chat.completions.create(stream=True, **args))
    assert all(c.usage is None for c in plain)


def test_n_and_stop(server):
    client = server.client()
    r = client.completions.create(model="tiny-llama", prompt="abc", max_tokens=6, n=3,
                                  temperature=1.0, seed=7, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert r.usage.completion_tokens == 18
    full = client.completions.create(model="tiny-llama", prompt="stop here", max_tokens=40,
                                     temperature=0).choices[0].text
    match = re.search(r"<\|t\d+\|>", full)
    assert match, full
    stopped = client.completions.create(model="tiny-llama", prompt="stop here", max_tokens=40,
                                        temperature=0, stop=[match.group()])
    assert stopped.choices[0].text == full[:match.start()]
    assert stopped.choices[0].finish_reason == "stop"


def test_per_model_port_routes_and_rejects(server):
    local = server.client(server.model_port)
    r = local.completions.create(model="tiny-llama", prompt="hi", max_tokens=3)
    assert r.model == "tiny-llama"
    with pytest.raises(openai.NotFoundError) as info:
        local.completions.create(model="tiny-qwen2", prompt="hi", max_tokens=3)
    message = info.value.body["message"]
    assert "serves only the model 'tiny-llama'" in message and str(server.port) in message
    assert info.value.body["param"] == "model"


def test_unknown_model_is_404_in_openai_shape(server):
    with pytest.raises(openai.NotFoundError) as info:
        server.client().chat.completions.create(model="gpt-9", messages=CHAT)
    body = info.value.body
    assert set(body) == {"message", "type", "param", "code"}
    assert body["code"] == "model_not_found" and "tiny-llama" in body["message"]


BAD_PARAMS = [
    ("completions", {"temperature": -1}, "temperature"),
    ("completions", {"top_p": 2}, "top_p"),
    ("completions", {"n": 0}, "n"),
    ("completions", {"max_tokens": 0}, "max_tokens"),
    ("completions", {"max_tokens": 100000}, "max_tokens"),
    ("completions", {"stop": 5}, "stop"),
    ("completions", {"logprobs": 99}, "logprobs"),
    ("completions", {"top_k": -5}, "top_k"),
    ("completions", {"min_p": 1.5}, "min_p"),
    ("completions", {"repetition_penalty": 0}, "repetition_penalty"),
    ("completions", {"presence_penalty": 3}, "presence_penalty"),
    ("completions", {"seed": "abc"}, "seed"),
    ("completions", {"prompt": []}, "prompt"),
    ("completions", {"prompt": [1, 99999]}, "prompt"),
    ("completions", {"stream_options": {"include_usage": True}}, "stream_options"),
    ("chat/completions", {"temperature": -1}, "temperature"),
    ("chat/completions", {"max_completion_tokens": 0}, "max_completion_tokens"),
    ("chat/completions", {"logprobs": True, "top_logprobs": 99}, "top_logprobs"),
    ("chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("chat/completions", {"messages": []}, "messages"),
    ("chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ("chat/completions", {"stop": [1, 2]}, "stop"),
]


@pytest.mark.parametrize("endpoint,override,param", BAD_PARAMS)
def test_invalid_parameter_is_400_naming_it(server, endpoint, override, param):
    body = {"model": "tiny-llama", "max_tokens": 4}
    body.update({"prompt": "hi"} if endpoint == "completions" else {"messages": CHAT})
    body.update(override)
    response = httpx.post(f"{server.url()}/v1/{endpoint}", json=body, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert error["message"] and "Traceback" not in error["message"]


def test_openai_client_sees_param(server):
    with pytest.raises(openai.BadRequestError) as info:
        server.client().completions.create(model="tiny-qwen2", prompt="x", temperature=-1)
    assert info.value.param == "temperature"


def test_malformed_json_and_wrong_bodies_are_400(server):
    url = server.url() + "/v1/chat/completions"
    for content, headers in ((b'{"model": "tiny-llama", "messages": [', {}),
                             (b"not json at all", {}), (b"[1, 2]", {}),
                             (b"hello", {"content-type": "text/plain"})):
        response = httpx.post(url, content=content,
                              headers={"content-type": "application/json", **headers})
        assert response.status_code == 400, (content, response.text)
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_oversized_body_is_413(server):
    big = json.dumps({"model": "tiny-llama", "prompt": "x" * 70000}).encode()
    response = httpx.post(server.url() + "/v1/completions", content=big,
                          headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"

    def chunked():  # no Content-Length: counted while it arrives
        for _ in range(20):
            yield b" " * 8192

    response = httpx.post(server.url() + "/v1/completions", content=chunked(),
                          headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert server.client().models.list().data  # still serving


def test_tokenize_detokenize_health_version(server):
    ids = tokenize(server, model="tiny-qwen2", prompt="héllo", add_special_tokens=False)
    response = httpx.post(server.url() + "/detokenize", json={"model": "tiny-qwen2", "tokens": ids})
    assert response.json() == {"prompt": "héllo"}
    bad = httpx.post(server.url() + "/detokenize", json={"model": "tiny-qwen2", "tokens": [-1]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    assert httpx.get(server.url() + "/health").status_code == 200
    assert httpx.get(server.url() + "/version").json()["version"]
    assert "/v1/chat/completions" in httpx.get(server.url() + "/openapi.json").json()["paths"]
    missing = httpx.get(server.url() + "/v1/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
