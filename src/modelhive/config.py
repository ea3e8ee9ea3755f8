"""Frozen user-facing specs: ModelSpec (one served model) and memory-size parsing.

A spec is what the user asked for; anything computed from it (block counts, resolved dtype, token
budgets) lives in separate resolved objects (``planner.MemoryPlan``), never written back here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from modelhive.errors import ConfigError

DTYPES = ("auto", "float32", "float16", "bfloat16")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")


@dataclass(frozen=True)
class ModelSpec:
    """One model to serve.

    ``source``: a local HF directory, a ``.gguf`` file, ``package:NAME`` or ``preset:NAME``.
    ``dtype``: ``auto`` picks float32 on CPU and bfloat16 on CUDA (float16 if the checkpoint is
    float16). ``max_model_len``: prompt + output tokens per sequence (default: the architecture's
    limit, capped at 4096). ``kv_min_tokens`` / ``kv_max_tokens``: guaranteed KV and optional cap,
    in tokens of this model. ``priority``: higher is preempted last.
    """

    name: str
    source: str
    dtype: str = "auto"
    max_model_len: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int | None = None
    kv_min_tokens: int = 0
    kv_max_tokens: int | None = None
    priority: int = 0
    port: int | None = None
    chat_template: str | None = None
    max_queue: int = 256

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise ConfigError(f"model name {self.name!r} must be 1-128 letters, digits or ._:/-", key="name")
        if not isinstance(self.source, str) or not self.source:
            raise ConfigError(f"model {self.name}: source must be a non-empty string", key="source")
        if self.dtype not in DTYPES:
            raise ConfigError(f"model {self.name}: dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}",
                              key="dtype")
        for key in ("max_model_len", "max_num_batched_tokens", "kv_max_tokens", "port"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ConfigError(f"model {self.name}: {key} must be a positive integer, got {value!r}", key=key)
        for key in ("max_num_seqs", "max_queue"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"model {self.name}: {key} must be a positive integer, got {value!r}", key=key)
        if isinstance(self.kv_min_tokens, bool) or not isinstance(self.kv_min_tokens, int) or self.kv_min_tokens < 0:
            raise ConfigError(f"model {self.name}: kv_min_tokens must be an integer >= 0", key="kv_min_tokens")
        if self.kv_max_tokens is not None and self.kv_max_tokens < self.kv_min_tokens:
            raise ConfigError(f"model {self.name}: kv_max_tokens must be >= kv_min_tokens", key="kv_max_tokens")
        if isinstance(self.priority, bool) or not isinstance(self.priority, int):
            raise ConfigError(f"model {self.name}: priority must be an integer", key="priority")


_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_memory(value: str | int | float, total_bytes: int | None = None, key: str = "memory") -> int:
    """Bytes from ``"32GiB"``, ``"500MB"``, an int of bytes, or a fraction of ``total_bytes`` (0 < f <= 1)."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a size like 8GiB or a fraction like 0.9, got {value!r}", key=key)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if 0 < value <= 1:
            if total_bytes is None:
                raise ConfigError(f"{key}: a fraction needs a device with known total memory", key=key)
            return int(value * total_bytes)
        if value > 1 and float(value).is_integer():
            return int(value)
        raise ConfigError(f"{key}: must be a positive size like 8GiB or a fraction in (0, 1], got {value!r}", key=key)
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m:
            number, unit = float(m.group(1)), (m.group(2) or "")
            if not unit:
                return parse_memory(number, total_bytes, key)
            result = int(number * _UNITS[unit.lower()])
            if result > 0:
                return result
    raise ConfigError(f"{key}: must be a size like 8GiB or a fraction like 0.9, got {value!r}", key=key)
