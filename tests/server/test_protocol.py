"""Request conversion and error mapping, without a server (milliseconds)."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from modelhive.errors import CapacityError, InvalidRequestError, ModelNotFoundError
from modelhive.server.errors import exception_response, param_from_loc, validation_error_response
from modelhive.server.protocol import ChatCompletionRequest, CompletionRequest, message_dicts

CHAT = [{"role": "user", "content": "hi"}]


def body(response) -> tuple[int, dict]:
    return response.status_code, json.loads(bytes(response.body))["error"]


@pytest.mark.parametrize("loc,param", [
    (("body", "temperature"), "temperature"),
    (("body", "stop", "str"), "stop"),
    (("body", "stop", "list[str]", 0), "stop[0]"),
    (("body", "messages", 0, "role"), "messages[0].role"),
    (("body", "messages", 1, "content", "list[ContentPart]", 0, "type"),
     "messages[1].content[0].type"),
    (("body",), None),
])
def test_param_from_loc(loc, param):
    assert param_from_loc(loc) == param


def test_completion_params_carry_extras_and_defaults():
    req = CompletionRequest(model="m", prompt="x", top_k=5, min_p=0.1, repetition_penalty=1.2,
                            ignore_eos=True, seed=3, stop="END", logprobs=2)
    p = req.to_sampling_params(num_prompt_tokens=4, max_model_len=64)
    assert (p.max_tokens, p.top_k, p.min_p, p.repetition_penalty) == (16, 5, 0.1, 1.2)
    assert (p.ignore_eos, p.seed, p.stop, p.logprobs, p.temperature) == (True, 3, ("END",), 2, 1.0)


def test_chat_max_tokens_default_fills_the_context_and_new_name_wins():
    req = ChatCompletionRequest(messages=CHAT)
    assert req.to_sampling_params(10, 64).max_tokens == 54
    req = ChatCompletionRequest(messages=CHAT, max_tokens=5, max_completion_tokens=7)
    assert req.to_sampling_params(10, 64).max_tokens == 7


@pytest.mark.parametrize("fields,param", [
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"max_tokens": 100}, "max_tokens"),
    ({"logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ({"top_logprobs": 1}, "top_logprobs"),
    ({"tools": [{"type": "function"}]}, "tools"),
    ({"logit_bias": {"1": 5.0}}, "logit_bias"),
])
def test_chat_errors_name_the_field_as_sent(fields, param):
    with pytest.raises(InvalidRequestError) as info:
        ChatCompletionRequest(messages=CHAT, **fields).to_sampling_params(10, 64)
    assert info.value.param == param
    assert str(info.value).startswith(param) or param in str(info.value)


def test_prompt_longer_than_context_names_the_prompt():
    with pytest.raises(InvalidRequestError) as info:
        ChatCompletionRequest(messages=CHAT).to_sampling_params(64, 64)
    assert info.value.param == "messages"


def test_prompt_forms():
    assert CompletionRequest(prompt="a").prompts() == ["a"]
    assert CompletionRequest(prompt=[1, 2]).prompts() == [[1, 2]]
    assert CompletionRequest(prompt=["a", "b"]).prompts() == ["a", "b"]
    assert CompletionRequest(prompt=[[1], [2, 3]]).prompts() == [[1], [2, 3]]
    with pytest.raises(InvalidRequestError):
        CompletionRequest(prompt=["a", ""]).prompts()


def test_message_parts_join_and_images_are_refused():
    msgs = ChatCompletionRequest(messages=[{"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]).messages
    assert message_dicts(msgs) == [{"role": "user", "content": "ab"}]
    msgs = ChatCompletionRequest(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]).messages
    with pytest.raises(InvalidRequestError) as info:
        message_dicts(msgs)
    assert info.value.param == "messages[0].content[0].type"


def test_exception_mapping():
    assert body(exception_response(InvalidRequestError("n bad", param="n")))[0] == 400
    status, err = body(exception_response(ModelNotFoundError("x", ["a", "b"])))
    assert status == 404 and err["code"] == "model_not_found" and "a, b" in err["message"]
    full = exception_response(CapacityError("queue full", retry_after=2.5))
    assert full.status_code == 429 and full.headers["retry-after"] == "3"
    assert exception_response(CapacityError("down", status=503)).status_code == 503
    status, err = body(exception_response(RuntimeError("secret /path/in/stack")))
    assert status == 500 and "secret" not in err["message"]


def test_pydantic_errors_become_400_with_param():
    with pytest.raises(ValidationError) as info:
        CompletionRequest.model_validate({"prompt": "x", "temperature": "hot"})
    errors = [{**e, "loc": ("body", *e["loc"])} for e in info.value.errors()]
    status, err = body(validation_error_response(errors))
    assert status == 400 and err["param"] == "temperature" and "hot" in err["message"]
