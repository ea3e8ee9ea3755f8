"""Shared helpers for engine tests: hives of tiny presets with a pool of a chosen size."""

from __future__ import annotations

import pytest

from modelhive import Hive, ModelSpec
from modelhive.models.loader import resolve_source
from modelhive.planner.memory import plan_memory

THREE = [
    ModelSpec(name="llama", source="preset:tiny-llama", dtype="float32", max_model_len=256,
              max_num_seqs=32, max_num_batched_tokens=128),
    ModelSpec(name="qwen2", source="preset:tiny-qwen2", dtype="float32", max_model_len=256,
              max_num_seqs=32, max_num_batched_tokens=128),
    ModelSpec(name="gemma3", source="preset:tiny-gemma3", dtype="float32", max_model_len=256,
              max_num_seqs=32, max_num_batched_tokens=128),
]


def budget_for_blocks(specs, num_blocks: int, policy: str = "shared") -> int:
    """The memory budget that leaves exactly ``num_blocks`` KV blocks after the fixed terms."""
    archs = {s.name: resolve_source(s.source).arch for s in specs}
    big = plan_memory(specs, archs, device="cpu", budget="4GiB", total_device_bytes=None,
                      policy=policy)
    fixed = big.budget_bytes - big.kv_pool_bytes
    return fixed + num_blocks * big.block_bytes


@pytest.fixture(scope="session")
def roomy_hive() -> Hive:
    return Hive(THREE, device="cpu", memory=budget_for_blocks(THREE, 600))
