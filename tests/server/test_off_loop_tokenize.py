"""In-process app: prompt text is encoded (and /detokenize decodes) on a worker thread, never on
the event loop that streams every request's tokens."""

from __future__ import annotations

import threading

from fastapi.testclient import TestClient

from modelhive.config import ModelSpec
from modelhive.engine.client import AsyncEngine
from modelhive.engine.hive import build_engine
from modelhive.server.app import create_app


def test_text_is_encoded_and_decoded_off_the_event_loop():
    engine = build_engine([ModelSpec(name="t", source="preset:tiny-llama", max_model_len=256,
                                     max_num_seqs=4)], device="cpu", memory="64MiB")
    tokenizer = engine.models["t"].tokenizer
    threads: list[tuple[str, int]] = []
    encode, decode = tokenizer.encode, tokenizer.decode

    def recording_encode(*args, **kwargs):
        threads.append(("encode", threading.get_ident()))
        return encode(*args, **kwargs)

    def recording_decode(*args, **kwargs):
        threads.append(("decode", threading.get_ident()))
        return decode(*args, **kwargs)

    tokenizer.encode, tokenizer.decode = recording_encode, recording_decode
    async_engine = AsyncEngine(engine)
    with TestClient(create_app(async_engine, manage_engine=True)) as client:
        loop_thread = client.portal.call(threading.get_ident)  # the app's event loop
        requests = [("/v1/completions", {"model": "t", "prompt": "hello there", "max_tokens": 2}),
                    ("/v1/completions", {"model": "t", "prompt": ["a b", "c d"],
                                         "max_tokens": 2, "stream": True}),
                    ("/tokenize", {"model": "t", "prompt": "hello there"}),
                    ("/detokenize", {"model": "t", "tokens": [300, 301]})]
        for path, body in requests:
            assert client.post(path, json=body).status_code == 200, path
    kinds = {kind for kind, _ in threads}
    assert kinds == {"encode", "decode"}
    assert loop_thread not in {ident for _, ident in threads}
