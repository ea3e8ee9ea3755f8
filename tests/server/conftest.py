"""A real `python -m modelhive serve` subprocess per test module (tiny presets, CPU)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

STARTUP_TIMEOUT_S = 120

TINY_CONFIG = """\
memory: 256MiB
device: cpu
models:
  - name: tiny-llama
    source: preset:tiny-llama
    max_model_len: 512
    max_num_seqs: 16
    port: {model_port}
  - name: tiny-qwen2
    source: preset:tiny-qwen2
    max_model_len: 512
    max_num_seqs: 16
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    port: int
    model_port: int | None
    log_path: Path

    def url(self, port: int | None = None) -> str:
        return f"http://127.0.0.1:{port or self.port}"

    def client(self, port: int | None = None, api_key: str = "unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url(port) + "/v1", api_key=api_key, max_retries=0,
                             timeout=60)

    def async_client(self, port: int | None = None) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url(port) + "/v1", api_key="unused",
                                  max_retries=0, timeout=60)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_server(workdir: Path, *args: str, use_config: bool = True,
                 env: dict[str, str] | None = None) -> ServerProcess:
    """Start the server (on the tiny config unless ``use_config`` is False: then ``args`` name the
    models), wait for /health; fail with the server's log if it dies or stays unhealthy."""
    port = free_port()
    extra_port = None
    config_args: list[str] = []
    if use_config:
        extra_port = free_port()
        config = workdir / "hive.yaml"
        config.write_text(TINY_CONFIG.format(model_port=extra_port))
        config_args = [str(config)]
    log_path = workdir / "server.log"
    cmd = [sys.executable, "-m", "modelhive", "serve", *config_args, "--port", str(port),
           "--no-access-log", *args]
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})})
    server = ServerProcess(proc, port, extra_port, log_path)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{server.log()[-3000:]}")
        try:
            if httpx.get(server.url() + "/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    server.stop()
    pytest.fail(f"server did not become healthy in {STARTUP_TIMEOUT_S} s:\n{server.log()[-3000:]}")


def metric_values(base_url: str) -> dict[tuple[str, tuple], float]:
    """/metrics parsed with prometheus_client's parser: {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(base_url + "/metrics", timeout=10).text
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> ServerProcess:
    srv = start_server(tmp_path_factory.mktemp("serve"), "--max-request-bytes", "65536")
    yield srv
    code = srv.stop()
    assert code == 0, f"server exited with {code}:\n{srv.log()[-3000:]}"
