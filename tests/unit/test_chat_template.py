"""Chat templates: same output as transformers, sandboxed, time-limited, clear errors."""

from __future__ import annotations

import time

import pytest

from modelhive.errors import ConfigError, InvalidRequestError
from modelhive.models import chat_template
from modelhive.models.chat_template import (
    CHATML_TEMPLATE,
    GEMMA3_TEMPLATE,
    render_chat_template,
)

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi ✓ 你好"},
     {"role": "assistant", "content": "  Hey.  "}, {"role": "user", "content": "2+2?"}],
]
# exercises tojson (no HTML escaping), namespace, loop controls, strftime_now, trim/lstrip blocks
FEATURE_TEMPLATE = """{% set ns = namespace(n=0) %}
{% for m in messages %}
  {% if m.role == 'system' %}{% continue %}{% endif %}
  {% set ns.n = ns.n + 1 %}
  {{ m | tojson }} {{ ns.n }}
{% endfor %}
{{ strftime_now('%Y') | length }}{{ {'a': '<b>'} | tojson }}"""


@pytest.mark.parametrize("template", [CHATML_TEMPLATE, GEMMA3_TEMPLATE, FEATURE_TEMPLATE])
@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_renders_like_transformers(template: str, messages: list, add_generation_prompt: bool) -> None:
    from transformers.utils.chat_template_utils import render_jinja_template

    expected, _ = render_jinja_template([messages], chat_template=template,
                                        add_generation_prompt=add_generation_prompt,
                                        bos_token="<bos>")
    ours = render_chat_template(template, messages, add_generation_prompt, bos_token="<bos>")
    assert ours == expected[0]


def test_gemma3_template_shape() -> None:
    text = render_chat_template(GEMMA3_TEMPLATE, CONVERSATIONS[1], True, bos_token="<bos>")
    assert text == ("<bos><start_of_turn>user\nBe brief.\n\nHi ✓ 你好<end_of_turn>\n"
                    "<start_of_turn>model\nHey.<end_of_turn>\n<start_of_turn>user\n2+2?<end_of_turn>\n"
                    "<start_of_turn>model\n")


@pytest.mark.parametrize("escape", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ ''.__class__ }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ raise_exception.__globals__ }}",
    "{{ messages.append(1) }}",
    "{% set ns = namespace() %}{% set ns._x = 1 %}",
    "{{ self._TemplateReference__context }}",
])
def test_sandbox_escapes_fail_safely(escape: str) -> None:
    try:
        out = render_chat_template(escape, [{"role": "user", "content": "x"}])
    except InvalidRequestError as exc:
        assert exc.param == "messages"
        return
    # jinja's sandbox may also render an unsafe attribute as undefined (empty): nothing leaks
    assert "class" not in out and "subclasses" not in out and "uid=" not in out
    assert "module" not in out and "function" not in out


def test_no_file_access() -> None:
    for template in ("{% include '/etc/passwd' %}", "{{ open('/etc/passwd').read() }}",
                     "{% import '/etc/hosts' as h %}"):
        with pytest.raises(InvalidRequestError):
            render_chat_template(template, [])


@pytest.mark.parametrize("template", [
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
    "{% for i in range(100000) %}{% for j in range(100000) %}{{ messages[0] }}{% endfor %}"
    "{% endfor %}",
    "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
])
def test_runaway_template_errors_within_limit(template: str, monkeypatch) -> None:
    monkeypatch.setattr(chat_template, "RENDER_TIMEOUT_S", 0.3)
    start = time.monotonic()
    with pytest.raises(InvalidRequestError):
        render_chat_template(template, [{"role": "user", "content": "x"}])
    assert time.monotonic() - start < 3.0


@pytest.mark.parametrize("template", [
    "{{ 'x' * 10**9 }}", "{{ [1] * 100000000 }}", "{{ 9 ** 999999999 }}",
    "{{ range(10**9) | list }}",
    # doubling through a namespace with ~ and +, and width arguments that allocate
    "{% set ns = namespace(s='xxxxxxxx') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}"
    "{% endfor %}{{ ns.s | length }}",
    "{% set ns = namespace(s='xxxxxxxx') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}"
    "{% endfor %}{{ ns.s | length }}",
    "{{ 'x'.center(999999999) }}", "{{ 'x' | center(999999999) }}",
    "{{ 'x'.zfill(999999999) }}", "{{ 'a\tb'.expandtabs(999999999) }}",
])
def test_memory_bombs_are_refused(template: str) -> None:
    with pytest.raises(InvalidRequestError):
        render_chat_template(template, [])


def test_syntax_error_is_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        render_chat_template("{% for m in messages %}", [])
    assert info.value.key == "chat_template" and "does not parse" in str(info.value)


def test_raise_exception_is_invalid_request() -> None:
    with pytest.raises(InvalidRequestError, match="roles must alternate"):
        render_chat_template(GEMMA3_TEMPLATE, [{"role": "assistant", "content": "x"}],
                             bos_token="<bos>")
