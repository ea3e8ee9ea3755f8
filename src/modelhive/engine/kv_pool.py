"""The shared KV pool: one byte tensor of uniform blocks that any model can borrow.

Layout (ARCHITECTURE.md): model m stores, per block, all of its layers for T_m tokens as
``[layers, 2 (K,V), T_m, kv_heads, head_dim]``. ``T_m = block_bytes // bytes_per_token_m``, so the
waste is under one token per block. Per layer, a model sees strided views
``[num_blocks, T_m, kv_heads, head_dim]`` of the same storage; kernels gather through
``block_table[pos // T_m]`` and ``pos % T_m``.

Two parts:
- ``KVPool`` owns the tensor and hands out views (touches torch).
- ``BlockAllocator`` decides who owns which block (pure Python, O(1) alloc/free per block).

Contract of ``BlockAllocator``:
- A block is either on the free list or owned by exactly one model; ``check_integrity()`` asserts
  ``free + sum(used) == total`` and that no block is in two places.
- Each model has a guaranteed minimum (``min_blocks``): blocks the others can never take while the
  model uses fewer than that; an optional cap (``max_blocks``); and a priority used by the
  scheduler's preemption (higher priority is preempted last).
- The caller (the scheduler) frees blocks when a sequence finishes, aborts or is preempted.
- The static split of the vLLM-containers setup is ``min_blocks == max_blocks == share``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from modelhive.errors import ConfigError
from modelhive.models.arch import DTYPE_BYTES, ArchConfig

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

#: smallest number of tokens the model with the largest per-token KV gets in one block
MIN_TOKENS_PER_BLOCK = 16
#: blocks are sized in multiples of this many bytes (keeps every dtype view aligned)
BLOCK_ALIGN_BYTES = 256


@dataclass(frozen=True)
class KVLayout:
    """How one model sees a pool block: all its layers for ``tokens_per_block`` tokens."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    tokens_per_block: int

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * DTYPE_BYTES[self.dtype]

    @property
    def used_bytes_per_block(self) -> int:
        return self.bytes_per_token * self.tokens_per_block

    @classmethod
    def for_model(cls, arch: ArchConfig, dtype: str, block_bytes: int) -> KVLayout:
        per_token = arch.kv_bytes_per_token(dtype)
        tokens = block_bytes // per_token
        if tokens < 1:
            raise ConfigError(f"a pool block of {block_bytes} bytes cannot hold one token of {per_token} bytes")
        return cls(arch.num_layers, arch.num_kv_heads, arch.head_dim, dtype, tokens)

    def blocks_for_tokens(self, num_tokens: int) -> int:
        return -(-num_tokens // self.tokens_per_block)


def choose_block_bytes(bytes_per_token: list[int], min_tokens: int = MIN_TOKENS_PER_BLOCK) -> int:
    """Smallest aligned block size that gives the model with the largest per-token KV ``min_tokens``."""
    if not bytes_per_token:
        raise ConfigError("no models: cannot size KV pool blocks")
    need = max(bytes_per_token) * min_tokens
    return math.ceil(need / BLOCK_ALIGN_BYTES) * BLOCK_ALIGN_BYTES


class KVPool:
    """One device tensor of ``num_blocks * block_bytes`` bytes, viewed per model and per layer."""

    def __init__(self, num_blocks: int, block_bytes: int, device: torch.device | str = "cpu"):
        if num_blocks <= 0:
            raise ConfigError(f"the KV pool needs at least one block, got {num_blocks}")
        if block_bytes % BLOCK_ALIGN_BYTES:
            raise ConfigError(f"block_bytes must be a multiple of {BLOCK_ALIGN_BYTES}")
        self.num_blocks = num_blocks
        self.block_bytes = block_bytes
        self.storage = torch.zeros(num_blocks * block_bytes, dtype=torch.uint8, device=device)

    @property
    def nbytes(self) -> int:
        return self.num_blocks * self.block_bytes

    def layer_views(self, layout: KVLayout) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, (K, V) views of shape ``[num_blocks, T, kv_heads, head_dim]`` into the pool."""
        elem = DTYPE_BYTES[layout.dtype]
        if layout.used_bytes_per_block > self.block_bytes:
            raise ConfigError("layout does not fit in a pool block")
        typed = self.storage.view(TORCH_DTYPES[layout.dtype])
        block_elems = self.block_bytes // elem
        t, kvh, hd = layout.tokens_per_block, layout.num_kv_heads, layout.head_dim
        size = (self.num_blocks, t, kvh, hd)
        stride = (block_elems, kvh * hd, hd, 1)
        plane = t * kvh * hd  # elements of one K (or V) plane of one layer in a block
        views = []
        for layer in range(layout.num_layers):
            k = typed.as_strided(size, stride, storage_offset=(2 * layer) * plane)
            v = typed.as_strided(size, stride, storage_offset=(2 * layer + 1) * plane)
            views.append((k, v))
        return views


@dataclass(frozen=True)
class ModelQuota:
    """Per-model share of the pool, in blocks. ``max_blocks=None`` means no cap."""

    min_blocks: int = 0
    max_blocks: int | None = None
    priority: int = 0


class BlockAllocator:
    """Pure-Python owner map of pool blocks (see module docstring for the contract)."""

    def __init__(self, num_blocks: int, quotas: dict[str, ModelQuota]):
        total_min = sum(q.min_blocks for q in quotas.values())
        if total_min > num_blocks:
            raise ConfigError(
                f"guaranteed KV minimums add up to {total_min} blocks but the pool has {num_blocks}"
            )
        for name, q in quotas.items():
            if q.min_blocks < 0 or (q.max_blocks is not None and q.max_blocks < q.min_blocks):
                raise ConfigError(f"model {name}: need 0 <= kv min <= kv max", key="kv_min_blocks")
        self.num_blocks = num_blocks
        self.quotas = dict(quotas)
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() gives low ids first
        self._owner: list[str | None] = [None] * num_blocks
        self._used: dict[str, int] = {name: 0 for name in quotas}
        self._unmet_total = total_min  # sum over models of max(0, min - used)

    # ------------------------------------------------------------------------------ queries
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def num_used_blocks(self, model: str) -> int:
        return self._used[model]

    def _unmet(self, model: str) -> int:
        return max(0, self.quotas[model].min_blocks - self._used[model])

    def num_available(self, model: str) -> int:
        """Blocks ``model`` could take now: free ones not held back for other models' minimums, under its cap."""
        reserved_for_others = self._unmet_total - self._unmet(model)
        avail = len(self._free) - reserved_for_others
        cap = self.quotas[model].max_blocks
        if cap is not None:
            avail = min(avail, cap - self._used[model])
        return max(0, avail)

    def can_allocate(self, model: str, num_blocks: int) -> bool:
        return num_blocks <= self.num_available(model)

    def is_capped(self, model: str, extra_blocks: int) -> bool:
        """True when ``model`` could never get ``extra_blocks`` more because of its own cap."""
        cap = self.quotas[model].max_blocks
        return cap is not None and self._used[model] + extra_blocks > cap

    # ---------------------------------------------------------------------------- changes
    def allocate(self, model: str, num_blocks: int) -> list[int]:
        if not self.can_allocate(model, num_blocks):
            raise RuntimeError(f"allocator: {model} asked for {num_blocks} blocks, "
                               f"{self.num_available(model)} available")
        before = self._unmet(model)
        blocks = [self._free.pop() for _ in range(num_blocks)]
        for b in blocks:
            self._owner[b] = model
        self._used[model] += num_blocks
        self._unmet_total += self._unmet(model) - before
        return blocks

    def free(self, model: str, blocks: list[int]) -> None:
        before = self._unmet(model)
        for b in blocks:
            if self._owner[b] != model:
                raise RuntimeError(f"allocator: block {b} is owned by {self._owner[b]}, not {model}")
            self._owner[b] = None
            self._free.append(b)
        self._used[model] -= len(blocks)
        self._unmet_total += self._unmet(model) - before

    def check_integrity(self) -> None:
        """Assert free + used == total, no block both free and owned, and counts match owners."""
        free_set = set(self._free)
        assert len(free_set) == len(self._free), "a block is on the free list twice"
        counts: dict[str, int] = {name: 0 for name in self.quotas}
        for b, owner in enumerate(self._owner):
            if owner is None:
                assert b in free_set, f"block {b} is neither free nor owned"
            else:
                assert b not in free_set, f"block {b} is free and owned by {owner}"
                counts[owner] += 1
        assert counts == self._used, f"per-model counts {self._used} != owners {counts}"
        assert len(self._free) + sum(counts.values()) == self.num_blocks
        unmet = sum(max(0, q.min_blocks - self._used[m]) for m, q in self.quotas.items())
        assert unmet == self._unmet_total, "reserve bookkeeping drifted"
        for m, q in self.quotas.items():
            assert q.max_blocks is None or self._used[m] <= q.max_blocks, f"{m} is over its cap"
