"""Output side of the engine: incremental detokenization, stop strings, per-request deltas."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class TokenLogprob:  # a record, never changed once made; not frozen (one per token: as CompletionDelta)
    token_id: int
    token: str
    logprob: float
    top: tuple[tuple[int, str, float], ...]  # (token_id, token text, logprob)


@dataclass(slots=True)
class CompletionDelta:
    """What one completion produced in one step (the unit streamed to clients). A record, never
    changed once made; not frozen, which would make building one per token ~6x slower."""

    request_id: str
    index: int
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str | None  # "stop" | "length" | "abort" | "error" | None while running
    logprobs: tuple[TokenLogprob, ...] | None
    num_prompt_tokens: int
    num_output_tokens: int  # total generated so far
    error: str | None = None
    #: with ``prompt_logprobs``: the prompt tokens' logprobs (positions 1..; position 0 has
    #: none), on the delta of the first output token
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None


@dataclass
class Detokenizer:
    """Turns a sequence's output ids into text, holding back what may still change.

    ``advance`` decodes incrementally (vLLM's prefix/read offsets): each step decodes only the
    tokens since the previous emission plus the chunk before them, so the cost per token does not
    grow with the output. The chunk before is decoded too because tokenizers drop or merge
    characters at the start of a decode (SentencePiece's leading space, multi-token UTF-8).
    Held back: a trailing incomplete UTF-8 character (decoded as U+FFFD), and the tail that could
    be the start of a stop string. ``emitted`` counts characters already sent.

    ``decoded`` (the text of ``ids[:read_offset]``) is kept as a string plus the pieces ``emit``
    appended since it was last needed, joined on demand: appending to one growing string copied
    all of it for every token (quadratic in the output; 20 % more host work a step at ~370
    tokens than at ~30, 232 sequences, ``bench/host_overhead.py``-style).
    """

    stop: tuple[str, ...]
    include_stop: bool
    text: str = ""  # the text ``update`` was last given
    emitted: int = 0
    max_stop_len: int = field(init=False)
    prefix_offset: int = 0
    read_offset: int = 0
    _decoded: str = ""  # ``decoded`` without ...
    _pieces: list[str] = field(default_factory=list)  # ... these pieces, appended after it
    _length: int = 0  # len(decoded)

    def __post_init__(self) -> None:
        self.max_stop_len = max((len(s) for s in self.stop), default=0)

    @property
    def decoded(self) -> str:
        """The text of ``ids[:read_offset]``."""
        if self._pieces:
            self._decoded += "".join(self._pieces)
            self._pieces.clear()
        return self._decoded

    def _append(self, text: str) -> None:
        self._pieces.append(text)
        self._length += len(text)

    def advance(self, decode, skip_special_tokens: bool, ids: list[int], finished: bool,
                decode_token=None) -> str:
        """Text of ``ids`` so far, decoding only the new tail.
        ``decode(ids, skip_special_tokens) -> str`` (``Tokenizer.decode``). ``decode_token(id,
        skip_special_tokens)`` (``Tokenizer.decode_token``, memoized), if given, decodes the chunk
        before when it is one token (the usual case: one token came since the last emission)."""
        p, r = self.prefix_offset, self.read_offset
        if decode_token is not None and r - p == 1:
            prefix_text = decode_token(ids[p], skip_special_tokens)
        else:
            prefix_text = decode(ids[p:r], skip_special_tokens)
        new_text = decode(ids[p:], skip_special_tokens)
        if len(new_text) > len(prefix_text) and (finished or not new_text.endswith("\ufffd")):
            self._append(new_text[len(prefix_text):])
            self.prefix_offset, self.read_offset = self.read_offset, len(ids)
        return self.decoded

    def advance_by(self, piece: str, num_ids: int) -> str:
        """``advance`` without decoding, when the only id not read yet (``read_offset ==
        num_ids - 1``) adds ``piece`` to any decode (``Tokenizer.appended_text``): ``advance``'s
        two decodes would give some text and that text + ``piece``, so it would emit ``piece``."""
        self._append(piece)
        self.prefix_offset, self.read_offset = self.read_offset, num_ids
        return self.decoded

    def emit(self, piece: str, num_ids: int) -> str:
        """``advance_by`` then ``update`` (finished or not: the same) without stop strings; returns
        the new text: all of it, as ``piece`` does not end in U+FFFD. O(1) unless an earlier
        step held a tail back (``decoded`` is not joined: ``text`` is left as it was)."""
        held = self._length - self.emitted  # a U+FFFD an earlier step held back, if any
        self._pieces.append(piece)  # ``_append`` inlined: once per token
        self._length = self.emitted = self._length + len(piece)
        self.prefix_offset, self.read_offset = self.read_offset, num_ids
        if held:
            return self.decoded[-(held + len(piece)):]
        return piece

    def update(self, text: str, finished: bool) -> tuple[str, bool]:
        """Take the full decoded text; return (new text to emit, hit a stop string)."""
        if not self.stop:  # the general case below with max_stop_len 0, without its searches
            self.text = text
            end = len(text) - (not finished and text.endswith("\ufffd"))
            new = text[self.emitted:end]
            self.emitted = max(self.emitted, end)
            return new, False
        self.text = text
        hit = False
        search_from = max(0, self.emitted - self.max_stop_len)
        best = None
        for s in self.stop:
            pos = text.find(s, search_from)
            if pos != -1 and (best is None or pos < best[0]):
                best = (pos, s)
        if best is not None:
            pos, s = best
            self.text = text[: pos + len(s)] if self.include_stop else text[:pos]
            hit = True
        if hit or finished:
            end = len(self.text)
        else:
            end = len(self.text)
            if self.text.endswith("\ufffd"):
                end -= 1
            end = max(self.emitted, end - max(0, self.max_stop_len - 1))
        new = self.text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return new, hit

