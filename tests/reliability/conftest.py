"""Shared pieces of the reliability suite: an in-process app on tiny presets, OpenAI error-shape
checks, RSS of a process, and /metrics pool figures. Subprocess servers come from
tests/server/conftest.py (``start_server``): real ``python -m modelhive serve``, 127.0.0.1 only."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from modelhive.config import ModelSpec
from modelhive.engine.client import AsyncEngine
from modelhive.engine.hive import build_engine
from tests.server.conftest import metric_values, server  # noqa: F401 (the fixture)

ERROR_KEYS = {"message", "type", "param", "code"}


def assert_openai_error(response, status: int | tuple[int, ...] | None = None) -> dict:
    """``response`` (httpx / TestClient) is an error in OpenAI's shape; returns its ``error``."""
    if status is not None:
        allowed = (status,) if isinstance(status, int) else status
        assert response.status_code in allowed, (response.status_code, response.text[:500])
    body = response.json()
    assert isinstance(body, dict) and set(body) == {"error"}, response.text[:500]
    error = body["error"]
    assert set(error) == ERROR_KEYS, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    assert "Traceback" not in error["message"], error
    return error


def tiny_specs(max_model_len: int = 128, max_num_seqs: int = 4, max_queue: int = 256,
               names: tuple[str, ...] = ("tiny-llama", "tiny-qwen2")) -> list[ModelSpec]:
    return [ModelSpec(name=n, source=f"preset:{n}", max_model_len=max_model_len,
                      max_num_seqs=max_num_seqs, max_queue=max_queue) for n in names]


@contextmanager
def running_engine(specs: list[ModelSpec], memory: str = "64MiB") -> Iterator[AsyncEngine]:
    """An ``AsyncEngine`` on its thread for an in-process app; pool checked whole on exit."""
    engine = AsyncEngine(build_engine(specs, device="cpu", memory=memory))
    engine.start()
    try:
        yield engine
        wait_until(lambda: not engine.call(lambda e: e.has_work), 30, "engine still busy")
        engine.call(lambda e: e.check_integrity())
        free = engine.call(lambda e: e.allocator.num_free_blocks)
        assert free == engine.engine.pool.num_blocks, "blocks left in use after the test"
    finally:
        engine.shutdown(timeout=30)


def wait_until(predicate, timeout_s: float, what: str, interval_s: float = 0.1) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} after {timeout_s} s")
        time.sleep(interval_s)


def rss_bytes(pid: int) -> int:
    """Resident set size of process ``pid`` (Linux /proc), bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def pool_figures(base_url: str) -> dict[str, float]:
    """Pool blocks from /metrics: total, free, used (summed over models), running, waiting."""
    values = metric_values(base_url)

    def total(name: str) -> float:
        return sum(v for (sample, _), v in values.items() if sample == name)

    return {"total": values[("modelhive:kv_blocks_total", ())],
            "free": values[("modelhive:kv_blocks_free", ())],
            "used": total("modelhive:kv_blocks_used"),
            "running": total("vllm:num_requests_running"),
            "waiting": total("vllm:num_requests_waiting")}


def wait_pool_free(base_url: str, timeout_s: float = 30) -> dict[str, float]:
    """Wait until no sequence runs or waits; then the pool must be whole (free == total)."""
    figures: dict[str, float] = {}

    def idle() -> bool:
        figures.update(pool_figures(base_url))
        return figures["running"] == 0 and figures["waiting"] == 0 and figures["used"] == 0

    wait_until(idle, timeout_s, "pool not free")
    assert figures["free"] == figures["total"], figures
    return figures


def soak_enabled(config: pytest.Config) -> bool:
    return os.environ.get("MODELHIVE_SOAK") == "1" or "soak" in (config.getoption("-m") or "")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Soak tests run only with ``-m soak`` or MODELHIVE_SOAK=1 (``make soak``)."""
    if soak_enabled(config):
        return
    skip = pytest.mark.skip(reason="long soak test: run `make soak` (or MODELHIVE_SOAK=1)")
    for item in items:
        if item.get_closest_marker("soak") is not None:
            item.add_marker(skip)
