"""GET /v1/hive/ps: the loaded models and the process's memory, planned vs measured (admin JSON).

Behind the API key like every route but /health. ``modelhive ps`` prints it as a table. Stable
keys (others may be added, never renamed):

- top level: ``device``, ``models``, ``terms``, ``budget_bytes``, ``block_bytes``,
  ``kv_blocks_total``, ``kv_blocks_free``, ``process``;
- per model: ``name``, ``processor``, ``context_length``, ``size_bytes`` (measured weights),
  ``planned`` and ``measured`` (``weights`` / ``activation`` / ``graphs`` bytes, null where not
  measured), ``kv`` (``blocks_used``, ``blocks_reachable``, ``blocks_guaranteed``,
  ``tokens_per_block``, ``tokens_used``, ``tokens_reachable``, ``bytes_used``), ``running``,
  ``waiting``;
- ``terms``: per term of ``engine.memory_report.TERMS`` ``{"planned", "measured"}`` bytes
  (``process`` is planned as the budget);
- ``process``: ``torch_allocated_bytes``, ``torch_reserved_bytes``, ``nvml_process_bytes``,
  ``rss_bytes``.

Tokens are block capacity (blocks held x tokens per block), in the model's own tokens.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request

from modelhive.engine.memory_report import (
    MeasuredMemory,
    measure_memory,
    planned_model_terms,
    planned_terms,
)
from modelhive.server.routes import get_state
from modelhive.server.state import ServerState

router = APIRouter()


def _processor(measured: MeasuredMemory, name: str, state: ServerState) -> str:
    """Where the model's parameters live, ollama-style: ``100% cuda:0``."""
    model = state.loaded(name).runner.model
    by_device: dict[str, int] = {}
    for p in model.parameters():
        key = str(p.device) if p.device.type == "cpu" or p.device.index is not None \
            else measured.device
        by_device[key] = by_device.get(key, 0) + p.numel() * p.element_size()
    total = sum(by_device.values()) or 1
    return "/".join(f"{round(100 * b / total)}% {d}" for d, b in sorted(by_device.items()))


def ps_snapshot(state: ServerState) -> dict[str, Any]:
    """The /v1/hive/ps body (reads allocator counters and NVML: call it off the event loop)."""
    engine = state.async_engine.engine
    stats = state.async_engine.stats
    plan = engine.plan
    measured = measure_memory(engine)
    models = []
    for name in state.model_names:
        mp = plan.model(name)
        s = stats.models.get(name)
        used = s.blocks_used if s else 0
        reachable = plan.reachable_blocks(name)
        models.append({
            "name": name,
            "processor": _processor(measured, name, state),
            "context_length": mp.max_model_len,
            "size_bytes": measured.model(name).weight_bytes,
            "planned": planned_model_terms(plan, name),
            "measured": measured.model_terms(name),
            "kv": {"blocks_used": used, "blocks_reachable": reachable,
                   "blocks_guaranteed": mp.min_blocks, "tokens_per_block": mp.tokens_per_block,
                   "tokens_used": used * mp.tokens_per_block,
                   "tokens_reachable": reachable * mp.tokens_per_block,
                   "bytes_used": used * plan.block_bytes},
            "running": s.running if s else 0,
            "waiting": s.waiting if s else 0,
        })
    got = measured.terms()
    return {
        "device": measured.device,
        "budget_bytes": plan.budget_bytes,
        "block_bytes": plan.block_bytes,
        "kv_blocks_total": stats.total_blocks,
        "kv_blocks_free": stats.free_blocks,
        "models": models,
        "terms": {t: {"planned": p, "measured": got[t]} for t, p in planned_terms(plan).items()},
        "process": {"torch_allocated_bytes": measured.torch_allocated_bytes,
                    "torch_reserved_bytes": measured.torch_reserved_bytes,
                    "nvml_process_bytes": measured.nvml_process_bytes,
                    "rss_bytes": measured.rss_bytes},
    }


@router.get("/v1/hive/ps")
async def hive_ps(request: Request) -> dict[str, Any]:
    return await asyncio.to_thread(ps_snapshot, get_state(request))
