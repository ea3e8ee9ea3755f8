"""The tokenizer the engine and server use: encode, decode, special ids and the chat template.

``HFTokenizer`` wraps ``tokenizers.Tokenizer`` loaded from a ``tokenizer.json`` (fast: no
transformers import). BOS/EOS handling comes from the file's post-processor, as in transformers 5
(which writes it from ``add_bos_token`` when it saves a tokenizer, and does not re-apply
tokenizer_config's ``add_bos_token`` on load), so ``encode`` gives the same ids as transformers'
tokenizer for the same files. ``ByteTokenizer`` serves preset models (random weights): ids < 256 are
bytes, a few ChatML specials follow, every other id decodes to a visible ``<|tN|>`` placeholder.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from modelhive.errors import ConfigError
from modelhive.models.chat_template import render_chat_template


class _LogprobTexts(dict):
    """Token id -> its text in logprobs (``Tokenizer.logprob_text``), decoded on first use: a
    hit is one dict lookup, which logprobs with alternatives make several times per token."""

    def __init__(self, decode, max_size: int) -> None:
        super().__init__()
        self._decode = decode
        self.max_size = max_size  # cleared when it holds this many

    def __missing__(self, token_id: int) -> str:
        if len(self) >= self.max_size:
            self.clear()
        text = self[token_id] = self._decode([token_id], False)  # skip_special_tokens=False
        return text


class Tokenizer:
    """Common surface; subclasses implement ``encode``, ``decode``, ``id_to_token``.

    ``eos_token_ids``: every id that ends a generation. ``vocab_size``: ids the tokenizer knows (may be
    below the model's embedding rows). ``chat_template``: Jinja source or None.
    """

    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    vocab_size: int
    chat_template: str | None
    special_tokens: dict[str, str]  # bos_token/eos_token/... -> text, passed to chat templates
    TOKEN_TEXTS_MAX = 1 << 16  # ``decode_token``'s memo is cleared when it holds this many

    def __init__(self) -> None:
        self._token_texts: dict[tuple[int, bool], str] = {}
        #: ``logprob_text`` of each id seen, as a mapping (``texts[id]``)
        self.logprob_texts = _LogprobTexts(self.decode, self.TOKEN_TEXTS_MAX)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        raise NotImplementedError

    def id_to_token(self, token_id: int) -> str:
        raise NotImplementedError

    def decode_token(self, token_id: int, skip_special_tokens: bool = True) -> str:
        """``decode([token_id], skip_special_tokens)``, memoized: ``Detokenizer.advance`` decodes
        each token alone again on the step after its own (as the chunk before the new one)."""
        key = (token_id, skip_special_tokens)
        text = self._token_texts.get(key)
        if text is None:
            if len(self._token_texts) >= self.TOKEN_TEXTS_MAX:
                self._token_texts.clear()
            text = self._token_texts[key] = self.decode([token_id], skip_special_tokens)
        return text

    def logprob_text(self, token_id: int) -> str:
        """A token's text in logprobs: what it decodes to alone, special tokens included
        (" Paris", not the vocabulary's "ĠParis"), as OpenAI and vLLM return it."""
        return self.logprob_texts[token_id]

    def appended_text(self, token_id: int) -> str | None:
        """The text ``token_id`` adds at the end of a decode whatever comes before it, if the
        tokenizer can tell without decoding: ``decode(ids + [token_id], skip) == decode(ids, skip)
        + text`` for every ``ids`` and ``skip``, ``text`` not empty and not ending in U+FFFD.
        Else None. Incremental detokenization then skips its decodes for that token."""
        return None

    def with_chat_template(self, template: str) -> Tokenizer:
        """A copy that uses ``template`` (Jinja source, or the path of a file holding it; a string
        without ``{`` that names an existing file is read). Raises ``ConfigError`` if it does not
        parse, so a bad template in a model spec fails at startup, not on the first request."""
        from modelhive.models.chat_template import compile_chat_template

        if "{" not in template and Path(template).expanduser().is_file():
            template = Path(template).expanduser().read_text()
        compile_chat_template(template)
        clone = copy.copy(self)
        clone.chat_template = template
        return clone

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            chat_template: str | None = None, **kwargs: Any) -> str:
        """Render ``messages`` to the prompt text (not ids); ``chat_template`` overrides the model's."""
        template = chat_template or self.chat_template
        if template is None:
            raise ConfigError("this model has no chat template; set chat_template in its model spec "
                              "or use the completions endpoint", key="chat_template")
        return render_chat_template(template, messages, add_generation_prompt,
                                    **{**self.special_tokens, **kwargs})


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # old tokenizer_config.json: {"content": "<s>", ...}
        return value.get("content")
    return value if isinstance(value, str) else None


class HFTokenizer(Tokenizer):
    """A ``tokenizer.json`` (+ ``tokenizer_config.json``, + ``chat_template.jinja``) directory."""

    def __init__(self, directory: Path, eos_token_ids: Sequence[int] = (),
                 chat_template: str | None = None):
        from tokenizers import Tokenizer as BackendTokenizer

        super().__init__()
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise ConfigError(f"{directory} has no tokenizer.json; add one (transformers' "
                              "tokenizer.save_pretrained writes it)", key="source")
        self._backend = BackendTokenizer.from_file(str(path))
        config_path = directory / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        self.special_tokens = {}
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            text = _token_text(config.get(key))
            if text is not None:
                self.special_tokens[key] = text
        bos = self.special_tokens.get("bos_token")
        self.bos_token_id = self._backend.token_to_id(bos) if bos else None
        eos_ids = list(eos_token_ids)
        eos = self.special_tokens.get("eos_token")
        eos_id = self._backend.token_to_id(eos) if eos else None
        if eos_id is not None and eos_id not in eos_ids:
            eos_ids.append(eos_id)
        self.eos_token_ids = tuple(eos_ids)
        self.vocab_size = self._backend.get_vocab_size(with_added_tokens=True)
        template_path = directory / "chat_template.jinja"
        if chat_template is None and template_path.is_file():
            chat_template = template_path.read_text()
        configured = config.get("chat_template")
        if isinstance(configured, list):  # named templates: [{"name": "default", "template": ...}]
            named = {t.get("name"): t.get("template") for t in configured if isinstance(t, dict)}
            configured = named.get("default")
        if chat_template is None and isinstance(configured, str):
            chat_template = configured
        self.chat_template = chat_template

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str:
        # ids past the tokenizer's vocabulary (embedding rows padded beyond it) decode to "" as in
        # ``decode``; the sampler can still pick them, so this must not raise
        return self._backend.id_to_token(token_id) or ""


class ByteTokenizer(Tokenizer):
    """Byte-level tokenizer covering a model's full vocabulary (for preset models).

    ids 0..255 are the UTF-8 bytes; then ``<|bos|>``, ``<|eos|>``, ``<|im_start|>``, ``<|im_end|>``;
    any other id < vocab_size decodes to ``<|tN|>``. ``encode`` recognises the special texts, so
    ChatML prompts built by ``CHATML_TEMPLATE`` tokenize to single special ids.
    """

    SPECIALS = ("<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>")
    BOS_ID, EOS_ID, IM_START_ID, IM_END_ID = 256, 257, 258, 259
    FIRST_PLAIN = 256 + len(SPECIALS)  # ids from here on decode to ``<|tN|>``

    def __init__(self, vocab_size: int, chat_template: str | None = None):
        from modelhive.models.chat_template import CHATML_TEMPLATE

        super().__init__()
        if vocab_size < 256 + len(self.SPECIALS):
            raise ConfigError(f"a byte tokenizer needs vocab_size >= 260, got {vocab_size}")
        self.vocab_size = vocab_size
        self.bos_token_id = self.BOS_ID
        self.eos_token_ids = (self.EOS_ID, self.IM_END_ID)
        self.chat_template = chat_template or CHATML_TEMPLATE
        self.special_tokens = {"bos_token": "<|bos|>", "eos_token": "<|im_end|>"}
        self._special_ids = {text: 256 + i for i, text in enumerate(self.SPECIALS)}
        self._special_re = re.compile("|".join(re.escape(s) for s in self.SPECIALS))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [self.BOS_ID] if add_special_tokens else []
        pos = 0
        for match in self._special_re.finditer(text):
            ids.extend(text[pos:match.start()].encode("utf-8"))
            ids.append(self._special_ids[match.group()])
            pos = match.end()
        ids.extend(text[pos:].encode("utf-8"))
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        out: list[str] = []
        pending = bytearray()
        first_plain = self.FIRST_PLAIN
        for token_id in ids:
            if 0 <= token_id < 256:
                pending.append(token_id)
                continue
            if pending:
                out.append(pending.decode("utf-8", errors="replace"))
                pending.clear()
            if first_plain <= token_id < self.vocab_size:  # the common case, inlined
                out.append(f"<|t{token_id}|>")
            elif not (skip_special_tokens and 256 <= token_id < first_plain):
                out.append(self.id_to_token(token_id))
        if pending:
            out.append(pending.decode("utf-8", errors="replace"))
        return "".join(out)

    def appended_text(self, token_id: int) -> str | None:
        # A placeholder: ``decode`` flushes the pending bytes as it does at the end, then appends
        # it. An ASCII byte cannot continue a multi-byte character, so it ends a partial one
        # before it as the end of the input does (errors="replace": the same U+FFFD), then
        # decodes to itself (checked in tests/unit/test_detok_fast_paths.py). Special ids are
        # not covered: their text depends on skip_special_tokens.
        if self.FIRST_PLAIN <= token_id < self.vocab_size:
            return f"<|t{token_id}|>"
        if 0 <= token_id < 128:
            return chr(token_id)
        return None

    def id_to_token(self, token_id: int) -> str:
        if not 0 <= token_id < self.vocab_size:
            raise KeyError(f"token id {token_id} is outside the vocabulary ({self.vocab_size})")
        if token_id < 256:
            return bytes([token_id]).decode("latin-1")
        if token_id < 256 + len(self.SPECIALS):
            return self.SPECIALS[token_id - 256]
        return f"<|t{token_id}|>"
