"""`modelhive serve --model ...` without a config; SIGTERM drains in-flight streams, then exit 0."""

from __future__ import annotations

import signal
import threading

import httpx

from tests.server.conftest import start_server

TEMPLATE = "{% for m in messages %}[{{ m['role'] }}|{{ m['content'] }}]{% endfor %}>>"


def test_cli_models_and_sigterm_drains_in_flight_streams(tmp_path):
    (tmp_path / "chat.jinja").write_text(TEMPLATE)
    srv = start_server(tmp_path, "--model", "preset:tiny-llama", "--model", "preset:tiny-qwen2",
                       "--served-model-name", "a", "--device", "cpu", "--memory", "128MiB",
                       "--max-model-len", "512", "--chat-template", str(tmp_path / "chat.jinja"),
                       use_config=False)
    try:
        names = sorted(m["id"] for m in httpx.get(srv.url() + "/v1/models").json()["data"])
        assert names == ["a", "tiny-qwen2"]
        ids = httpx.post(srv.url() + "/tokenize", json={
            "model": "a", "messages": [{"role": "user", "content": "hi"}]}).json()["tokens"]
        text = httpx.post(srv.url() + "/detokenize", json={"model": "a", "tokens": ids}).json()
        assert text == {"prompt": "[user|hi]>>"}  # --chat-template replaced the model's
        log = srv.log()
        assert "KV pool" in log and f"{srv.url()}/v1" in log  # the plan table and the URL

        lines: list[str] = []
        started = threading.Event()

        def stream() -> None:
            body = {"model": "a", "prompt": "x", "max_tokens": 300, "stream": True,
                    "ignore_eos": True}
            with httpx.stream("POST", srv.url() + "/v1/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line:
                        lines.append(line)
                        started.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert started.wait(30)
        srv.proc.send_signal(signal.SIGTERM)
        reader.join(60)
        assert srv.proc.wait(60) == 0, srv.log()[-3000:]
        assert lines[-1] == "data: [DONE]"
        assert '"finish_reason":"length"' in lines[-2], lines[-2]  # ran to the end, not cut off
        assert "finishing in-flight requests" in srv.log()
    finally:
        srv.stop()
