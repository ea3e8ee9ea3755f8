"""Chat templates rendered in a sandbox with a time and size limit.

Templates come with model files (GGUF metadata, tokenizer_config.json) or from the user, so they are
untrusted code. They render in jinja2's ``ImmutableSandboxedEnvironment`` with the same helpers and
options transformers gives them (``raise_exception``, ``strftime_now``, ``tojson``, trim_blocks,
lstrip_blocks, loopcontrols), so a template renders here exactly as in ``apply_chat_template``.

Limits on top of the sandbox: every attribute access, item access, call, ``*``/``**`` and range step
checks a deadline (``RENDER_TIMEOUT_S``); ``range`` is capped; the output is capped at
``MAX_OUTPUT_CHARS``. A template that loops (almost) forever therefore raises instead of hanging.

Errors: a template that does not parse raises ``ConfigError(key="chat_template")``; a template that
fails while rendering (``raise_exception``, a sandbox violation, the time limit) raises
``InvalidRequestError(param="messages")`` whose message says what went wrong.
"""

from __future__ import annotations

import contextvars
import json
import time
from collections.abc import Iterator
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from modelhive.errors import ConfigError, InvalidRequestError

RENDER_TIMEOUT_S = 2.0
MAX_RANGE = 100_000
MAX_OUTPUT_CHARS = 4_000_000
_MAX_SEQUENCE_PRODUCT = 1_000_000  # longest string/list that ``*`` may build

#: ChatML, used by preset models and as the default for sources without a template.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

#: Gemma 3's template (as in google/gemma-3-*-it), for GGUF files that ship without one.
GEMMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}"
    "{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- if (message['role'] == 'assistant') -%}{%- set role = 'model' -%}"
    "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- elif message['content'] is iterable -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- else -%}{{ raise_exception('Invalid content type') }}{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


# per render (context-local, so concurrent renders of one cached template don't interfere)
_DEADLINE: contextvars.ContextVar[float] = contextvars.ContextVar("chat_template_deadline",
                                                                 default=float("inf"))


class TemplateTimeout(jinja2.exceptions.TemplateError):
    """The template ran past its deadline or output limit."""


class _LimitedEnvironment(ImmutableSandboxedEnvironment):
    """Immutable sandbox whose hooks check a per-render deadline (set by ``render_chat_template``)."""

    intercepted_binops = frozenset(["*", "**", "+"])

    def check_deadline(self) -> None:
        if time.monotonic() > _DEADLINE.get():
            raise TemplateTimeout(f"chat template ran longer than {RENDER_TIMEOUT_S} s")

    @staticmethod
    def check_size(value: Any) -> Any:
        """Strings and lists a template builds stay under MAX_OUTPUT_CHARS (memory bombs: a
        value doubled in a loop through a namespace is caught at its next read)."""
        if isinstance(value, (str, list, tuple)) and len(value) > MAX_OUTPUT_CHARS:
            raise TemplateTimeout(f"chat template built a value over {MAX_OUTPUT_CHARS} items")
        return value

    def getattr(self, obj: Any, attribute: str) -> Any:
        self.check_deadline()
        return self.check_size(super().getattr(obj, attribute))

    def getitem(self, obj: Any, argument: Any) -> Any:
        self.check_deadline()
        return self.check_size(super().getitem(obj, argument))

    def call(self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N807
        self.check_deadline()
        # str.center/ljust/zfill/expandtabs(width) and friends allocate their int argument
        for value in (*args, *kwargs.values()):
            if isinstance(value, int) and not isinstance(value, bool) and value > MAX_OUTPUT_CHARS:
                raise jinja2.exceptions.SecurityError("chat template: argument too large")
        return self.check_size(super().call(__context, __obj, *args, **kwargs))

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        self.check_deadline()
        if operator == "+" and isinstance(left, (str, list, tuple)) and isinstance(
                right, (str, list, tuple)) and len(left) + len(right) > MAX_OUTPUT_CHARS:
            raise TemplateTimeout(f"chat template built a value over {MAX_OUTPUT_CHARS} items")
        if operator == "**" and isinstance(right, (int, float)) and abs(right) > 64:
            raise jinja2.exceptions.SecurityError("chat template: exponent too large")
        if operator == "*":
            for seq, count in ((left, right), (right, left)):
                if (isinstance(seq, (str, list, tuple)) and isinstance(count, int)
                        and len(seq) * count > _MAX_SEQUENCE_PRODUCT):
                    raise jinja2.exceptions.SecurityError("chat template: repeated sequence too long")
        return super().call_binop(context, operator, left, right)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    # transformers' tojson: no HTML escaping, json.dumps options exposed
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _TemplateNamespace(jinja2.utils.Namespace):
    """``namespace()`` that refuses underscore names (as transformers does)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 (jinja's signature trick)
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")


def _make_environment() -> _LimitedEnvironment:
    env = _LimitedEnvironment(trim_blocks=True, lstrip_blocks=True,
                              extensions=[jinja2.ext.loopcontrols])

    def limited_range(*args: int) -> Iterator[int]:
        values = range(*args)
        if len(values) > MAX_RANGE:
            raise jinja2.exceptions.SecurityError(f"chat template: range longer than {MAX_RANGE}")
        for i, value in enumerate(values):
            if i % 256 == 0:
                env.check_deadline()
            yield value

    env.filters["tojson"] = _tojson
    for name in ("center", "indent", "wordwrap", "truncate"):  # filters that take a width
        env.filters[name] = _width_limited(env.filters[name])
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now,
                       namespace=_TemplateNamespace, range=limited_range, dict=dict)
    return env


def _width_limited(flt):
    def limited(value, *args, **kwargs):
        for arg in (*args, *kwargs.values()):
            if isinstance(arg, int) and not isinstance(arg, bool) and arg > MAX_OUTPUT_CHARS:
                raise jinja2.exceptions.SecurityError("chat template: width argument too large")
        return flt(value, *args, **kwargs)

    return limited


@lru_cache(maxsize=64)
def compile_chat_template(template: str) -> jinja2.Template:
    """Parse ``template`` once (cached); raises ``ConfigError`` if it is not valid Jinja."""
    try:
        return _make_environment().from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise ConfigError(f"chat template does not parse (line {exc.lineno}: {exc.message}); "
                          "fix the template or set chat_template to a valid one",
                          key="chat_template") from exc


def render_chat_template(template: str, messages: list[dict[str, Any]],
                         add_generation_prompt: bool = True, **kwargs: Any) -> str:
    """Render ``messages`` with ``template``; extra ``kwargs`` (bos_token, tools, ...) are variables."""
    compiled = compile_chat_template(template)
    env: _LimitedEnvironment = compiled.environment  # type: ignore[assignment]
    token = _DEADLINE.set(time.monotonic() + RENDER_TIMEOUT_S)
    pieces: list[str] = []
    size = 0
    try:
        for piece in compiled.generate(messages=messages, add_generation_prompt=add_generation_prompt,
                                       **kwargs):
            size += len(piece)
            if size > MAX_OUTPUT_CHARS:
                raise TemplateTimeout(f"chat template output exceeds {MAX_OUTPUT_CHARS} characters")
            env.check_deadline()
            pieces.append(piece)
    except TemplateTimeout as exc:
        raise InvalidRequestError(f"chat template aborted: {exc}", param="messages") from exc
    except jinja2.exceptions.SecurityError as exc:
        raise InvalidRequestError(f"chat template tried an unsafe operation: {exc}",
                                  param="messages") from exc
    except RecursionError as exc:
        raise InvalidRequestError("chat template recursed too deeply", param="messages") from exc
    except (jinja2.exceptions.TemplateError, TypeError, ValueError, KeyError, IndexError,
            AttributeError) as exc:
        raise InvalidRequestError(f"chat template failed on these messages: {exc}",
                                  param="messages") from exc
    finally:
        _DEADLINE.reset(token)
    return "".join(pieces)
