"""`modelhive ps` and GET /v1/hive/ps against a real server subprocess (tiny presets, CPU), with
the API key on: every model listed with sane numbers, stable JSON keys, the memory gauges."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest

from tests.server.conftest import start_server

KEY = "sk-ps-0123456789"
MODELS = ("tiny-llama", "tiny-qwen2")
MODEL_KEYS = {"name", "processor", "context_length", "size_bytes", "planned", "measured", "kv",
              "running", "waiting"}
KV_KEYS = {"blocks_used", "blocks_reachable", "blocks_guaranteed", "tokens_per_block",
           "tokens_used", "tokens_reachable", "bytes_used"}
TERMS = {"weights", "activation", "graphs", "overhead", "kv_pool", "process"}


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("ps"), env={"MODELHIVE_API_KEY": KEY})
    yield srv
    assert srv.stop() == 0, srv.log()[-3000:]


def ps(srv, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "modelhive", "ps", "--url", srv.url(), *args],
                          capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "MODELHIVE_API_KEY": KEY})


def test_ps_json_keys_and_numbers(keyed):
    done = ps(keyed, "--json")
    assert done.returncode == 0, done.stderr
    body = json.loads(done.stdout)
    assert {"device", "models", "terms", "budget_bytes", "block_bytes", "kv_blocks_total",
            "kv_blocks_free", "process"} <= set(body)
    assert body["device"] == "cpu"
    assert [m["name"] for m in body["models"]] == list(MODELS)
    assert set(body["terms"]) == TERMS
    for m in body["models"]:
        assert MODEL_KEYS <= set(m) and KV_KEYS <= set(m["kv"])
        assert m["processor"] == "100% cpu" and m["context_length"] == 512
        # CPU: the weights term is the parameter bytes the model holds, equal to the plan
        assert m["size_bytes"] == m["planned"]["weights"] == m["measured"]["weights"] > 0
        assert m["planned"]["activation"] > 0 and m["measured"]["graphs"] is None
        kv = m["kv"]
        assert 0 < kv["blocks_reachable"] <= body["kv_blocks_total"]
        assert kv["tokens_reachable"] == kv["blocks_reachable"] * kv["tokens_per_block"]
        assert kv["blocks_used"] == 0 and m["running"] == m["waiting"] == 0
    terms = body["terms"]
    assert terms["weights"]["planned"] == terms["weights"]["measured"]
    assert terms["kv_pool"]["planned"] == terms["kv_pool"]["measured"] == \
        body["kv_blocks_total"] * body["block_bytes"]
    assert terms["process"]["planned"] == body["budget_bytes"]
    # the process (RSS) holds at least the weights and the pool
    assert terms["process"]["measured"] >= terms["weights"]["measured"] + \
        terms["kv_pool"]["measured"]
    assert body["process"]["rss_bytes"] == terms["process"]["measured"]


def test_ps_table_lists_every_model(keyed):
    done = ps(keyed)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split()[:3] == ["NAME", "SIZE", "PLANNED"]
    for name in MODELS:
        row = next(line for line in lines if line.startswith(name))
        assert "100% cpu" in row and " 512 " in row and "blocks" in row
    assert any(line.startswith("process / budget") for line in lines)


def test_ps_needs_the_key(keyed):
    assert httpx.get(keyed.url() + "/v1/hive/ps").status_code == 401
    done = subprocess.run([sys.executable, "-m", "modelhive", "ps", "--url", keyed.url()],
                          capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin"})
    assert done.returncode == 1
    assert "401" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_ps_without_server_is_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "modelhive", "ps", "--url",
                           "http://127.0.0.1:9"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "cannot reach" in done.stderr


def test_memory_gauges(keyed):
    text = httpx.get(keyed.url() + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    from prometheus_client.parser import text_string_to_metric_families

    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value

    def gauge(kind: str, model: str, term: str) -> float | None:
        return values.get((f"modelhive:memory_{kind}_bytes",
                           (("model_name", model), ("term", term))))

    for term in TERMS:
        assert gauge("planned", "", term) is not None, term
    for term in ("weights", "kv_pool", "process"):
        assert gauge("measured", "", term) > 0, term
    assert gauge("measured", "", "weights") == gauge("planned", "", "weights")
    assert gauge("measured", "", "graphs") is None  # CPU: no graphs
    for model in MODELS:
        for term in ("weights", "activation", "graphs"):
            assert gauge("planned", model, term) is not None
        assert gauge("measured", model, "weights") == gauge("planned", model, "weights") > 0
