"""Request bodies of the OpenAI-compatible API (pydantic v2) and their conversion to SamplingParams.

Field names are OpenAI's; extras keep vLLM's names (``top_k``, ``min_p``, ``repetition_penalty``,
``ignore_eos``, ``min_tokens``, ``stop_token_ids``, ...). Unknown fields are ignored, as vLLM does,
so clients that send newer OpenAI fields keep working. Types are checked here (pydantic -> 400
naming the field); ranges are checked once, in ``SamplingParams`` (-> 400 naming the field as the
client spelled it, e.g. ``max_completion_tokens`` or ``top_logprobs``).
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from modelhive.errors import InvalidRequestError
from modelhive.sampling_params import SamplingParams


def _encodable(text: str) -> str:
    """JSON may carry lone UTF-16 surrogates (``"\\ud800"``) that no tokenizer or UTF-8 response
    can encode; refuse them here, naming the field, instead of failing later with a 500."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("the text contains a lone UTF-16 surrogate (invalid Unicode); "
                         "send valid UTF-8 text") from None
    return text


#: a string that is valid Unicode (every text field of a request is one)
Text = Annotated[str, AfterValidator(_encodable)]


class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingRequest(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="ignore")

    model: Text | None = Field(None, description="a served model; optional when only one is served")
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Text | list[Text] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: Text | None = None
    logit_bias: dict[str, float] | None = None
    # extras, with vLLM's names
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    priority: int | None = Field(None, description="overrides the model's priority for this request")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def _requested_max_tokens(self) -> tuple[int | None, str]:
        return self.max_tokens, "max_tokens"

    _prompt_param: ClassVar[str] = "prompt"

    def _logprobs(self) -> tuple[int | None, str]:
        """(top alternatives per token or None, the field's name): each endpoint spells it."""
        raise NotImplementedError

    def _prompt_logprobs(self) -> int | None:
        """Top alternatives per prompt token, or None: the prompt is not scored."""
        return None

    def check_unsupported(self) -> None:
        if self.logit_bias:
            raise InvalidRequestError("logit_bias is not supported; remove it", param="logit_bias")
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError("stream_options is only allowed when stream is true",
                                      param="stream_options")

    def to_sampling_params(self, num_prompt_tokens: int, max_model_len: int) -> SamplingParams:
        """SamplingParams for one prompt of ``num_prompt_tokens`` tokens.

        ``max_tokens`` left out: as many as the model's context allows (vLLM's rule). Asked for
        more than the context allows: 400, as OpenAI and vLLM answer.
        """
        self.check_unsupported()
        requested, max_name = self._requested_max_tokens()
        room = max_model_len - num_prompt_tokens
        if room < 1:
            raise InvalidRequestError(
                f"the prompt has {num_prompt_tokens} tokens but this model's maximum context "
                f"length is {max_model_len}; shorten the prompt", param=self._prompt_param)
        if requested is not None and requested > room and requested >= 1:
            raise InvalidRequestError(
                f"This model's maximum context length is {max_model_len} tokens; the prompt has "
                f"{num_prompt_tokens} tokens, so {max_name} can be at most {room}, not "
                f"{requested}. Lower {max_name} or shorten the prompt", param=max_name)
        logprobs, logprobs_name = self._logprobs()
        renames = {"max_tokens": max_name, "logprobs": logprobs_name}
        try:
            return SamplingParams(
                max_tokens=room if requested is None else requested,
                temperature=1.0 if self.temperature is None else self.temperature,
                top_p=1.0 if self.top_p is None else self.top_p,
                top_k=0 if self.top_k is None else self.top_k,
                min_p=0.0 if self.min_p is None else self.min_p,
                seed=self.seed,
                presence_penalty=self.presence_penalty or 0.0,
                frequency_penalty=self.frequency_penalty or 0.0,
                repetition_penalty=(1.0 if self.repetition_penalty is None
                                    else self.repetition_penalty),
                stop=tuple(self.stop) if isinstance(self.stop, list) else (self.stop or ()),
                stop_token_ids=tuple(self.stop_token_ids or ()),
                ignore_eos=self.ignore_eos,
                min_tokens=self.min_tokens,
                logprobs=logprobs,
                prompt_logprobs=self._prompt_logprobs(),
                include_stop_str_in_output=self.include_stop_str_in_output,
                skip_special_tokens=self.skip_special_tokens,
                n=self.n,
            )
        except InvalidRequestError as exc:
            name = renames.get(exc.param or "", exc.param)
            message = str(exc)
            if name != exc.param and exc.param and message.startswith(exc.param):
                message = name + message[len(exc.param):]
            raise InvalidRequestError(message, param=name) from None


class CompletionRequest(_SamplingRequest):
    """POST /v1/completions."""

    prompt: Text | list[int] | list[Text] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for completions
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None

    def _logprobs(self) -> tuple[int | None, str]:
        return self.logprobs, "logprobs"

    @property
    def echo_only(self) -> bool:
        """``echo`` with ``max_tokens`` 0: the prompt (and its logprobs) back and nothing else,
        as vLLM answers; the engine generates one token, which the response leaves out."""
        return self.echo and self.max_tokens == 0

    def _requested_max_tokens(self) -> tuple[int | None, str]:
        return (1 if self.echo_only else self.max_tokens), "max_tokens"

    def _prompt_logprobs(self) -> int | None:
        # echo with logprobs: the prompt's tokens get logprobs too (what lm-eval's loglikelihood
        # requests read), as many alternatives as the output's
        return self.logprobs if self.echo else None

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.suffix:
            raise InvalidRequestError("suffix is not supported; remove it", param="suffix")

    def prompts(self) -> list[str | list[int]]:
        """The prompt(s) as a list: one string or token-id list per prompt."""
        p = self.prompt
        if isinstance(p, str):
            prompts: list[Any] = [p]
        elif p and all(isinstance(t, int) for t in p):
            prompts = [p]
        else:
            prompts = list(p)
        if not prompts or any(len(x) == 0 for x in prompts):
            raise InvalidRequestError("prompt must not be empty", param="prompt")
        return prompts


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str
    text: Text | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[ContentPart] | None = None
    name: Text | None = None


def message_dicts(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as the chat template expects them: content as one string (text parts joined)."""
    if not messages:
        raise InvalidRequestError("messages must contain at least one message", param="messages")
    out = []
    for i, m in enumerate(messages):
        if isinstance(m.content, list):
            texts = []
            for j, part in enumerate(m.content):
                if part.type != "text" or part.text is None:
                    raise InvalidRequestError(
                        f"content part type {part.type!r} is not supported; only text parts are",
                        param=f"messages[{i}].content[{j}].type")
                texts.append(part.text)
            content = "".join(texts)
        else:
            content = m.content or ""
        entry: dict[str, Any] = {"role": m.role, "content": content}
        if m.name is not None:
            entry["name"] = m.name
        out.append(entry)
    return out


class ChatCompletionRequest(_SamplingRequest):
    """POST /v1/chat/completions."""

    _prompt_param: ClassVar[str] = "messages"
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    tools: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None

    def _requested_max_tokens(self) -> tuple[int | None, str]:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"

    def _logprobs(self) -> tuple[int | None, str]:
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs needs logprobs set to true",
                                      param="top_logprobs")
        if not self.logprobs:
            return None, "top_logprobs"
        return (self.top_logprobs or 0), "top_logprobs"

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.tools:
            raise InvalidRequestError("tools are not supported by this server; remove them",
                                      param="tools")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise InvalidRequestError("only response_format {'type': 'text'} is supported",
                                      param="response_format")


class TokenizeRequest(BaseModel):
    """POST /tokenize: either ``prompt`` or ``messages`` (rendered with the chat template)."""

    model_config = ConfigDict(extra="ignore")

    model: Text | None = None
    prompt: Text | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # default: True for prompt, False for messages
    add_generation_prompt: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Text | None = None
    tokens: list[int]
