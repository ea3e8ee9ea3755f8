"""MemoryPlan: every byte of the device budget assigned before any weight is loaded.

    budget = weights (sum, exact) + activation peak (max over models: they run one after another)
           + CUDA graphs (sum) + overhead (CUDA context; 0 on CPU)
           + KV pool (the rest, whole blocks)

The plan is a separate resolved object: specs are never modified. ``fits`` is False, with one
sentence in ``problem``, when the fixed terms exceed the budget, the pool cannot hold one
``max_model_len`` sequence of some model, or the guaranteed minimums exceed the pool.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from modelhive.config import ModelSpec, parse_memory
from modelhive.engine.kv_pool import ModelQuota, choose_block_bytes
from modelhive.errors import ConfigError
from modelhive.models.arch import ArchConfig
from modelhive.planner import estimates
from modelhive.planner.estimates import GiB
from modelhive.planner.fit import find_problem, reachable_blocks

POLICIES = ("shared", "static")
DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class ModelPlan:
    """One model's resolved settings and memory terms (bytes, tokens, blocks)."""

    name: str
    source: str
    arch: ArchConfig
    dtype: str  # resolved, never "auto"
    params: int
    weight_bytes: int
    kv_bytes_per_token: int
    tokens_per_block: int
    min_blocks: int
    max_blocks: int | None
    priority: int
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    activation_bytes: int
    graph_bytes: int
    #: how many max_model_len sequences fit in the blocks this model can reach alone
    max_seqs_at_max_len: int

    @property
    def blocks_per_seq(self) -> int:
        """Blocks one ``max_model_len`` sequence of this model needs."""
        return -(-self.max_model_len // self.tokens_per_block)


@dataclass(frozen=True)
class MemoryPlan:
    device: str  # "cpu" | "cuda"
    policy: str  # "shared" | "static"
    budget_bytes: int
    weights_bytes: int
    activation_bytes: int
    graph_bytes: int
    overhead_bytes: int
    kv_pool_bytes: int
    block_bytes: int
    num_blocks: int
    models: tuple[ModelPlan, ...]
    fits: bool
    problem: str | None  # one sentence: the overflowing term, by how much, what to change

    def model(self, name: str) -> ModelPlan:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(
            f"no model {name!r} in the plan; planned: {', '.join(m.name for m in self.models)}"
        )

    def quotas(self) -> dict[str, ModelQuota]:
        return {m.name: ModelQuota(m.min_blocks, m.max_blocks, m.priority) for m in self.models}

    def reachable_blocks(self, name: str) -> int:
        """Blocks ``name`` can use when every other model is idle (their minimums stay reserved)."""
        return reachable_blocks(self.model(name), self.models, self.num_blocks)


def resolve_dtype(spec_dtype: str, arch: ArchConfig, device: str) -> str:
    """``auto`` -> float32 on CPU; on CUDA bfloat16 unless the checkpoint is float16."""
    if spec_dtype != "auto":
        return spec_dtype
    if device == "cpu":
        return "float32"
    return "float16" if arch.torch_dtype == "float16" else "bfloat16"


def _static_shares(weights: list[int], num_blocks: int) -> list[int]:
    """Split ``num_blocks`` in proportion to ``weights`` (largest remainder, sums to num_blocks)."""
    total = sum(weights)
    exact = [num_blocks * w / total for w in weights]
    shares = [int(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: exact[i] - shares[i], reverse=True)
    for i in by_remainder[: num_blocks - sum(shares)]:
        shares[i] += 1
    return shares


def _resolve_model(
    spec: ModelSpec, arch: ArchConfig, device: str, block_bytes: int, enforce_eager: bool,
    decode_steps: int,
) -> dict:
    dtype = resolve_dtype(spec.dtype, arch, device)
    if spec.max_model_len is not None and spec.max_model_len > arch.max_position_embeddings:
        raise ConfigError(
            f"model {spec.name}: max_model_len {spec.max_model_len} exceeds the "
            f"architecture's limit of {arch.max_position_embeddings} tokens; lower it",
            key="max_model_len",
        )
    max_len = spec.max_model_len or min(arch.max_position_embeddings, 4096)
    seqs = spec.max_num_seqs or estimates.DEFAULT_MAX_NUM_SEQS[device]
    default_batch = 2048 if device == "cuda" else 512
    batched = spec.max_num_batched_tokens or max(default_batch, seqs)
    per_token = arch.kv_bytes_per_token(dtype)
    tokens_per_block = block_bytes // per_token
    act = estimates.activation_bytes(
        arch,
        dtype,
        num_tokens=batched,
        max_num_seqs=seqs,
        max_model_len=max_len,
        device=device,
    )
    graphs = estimates.graph_bytes(
        arch,
        dtype,
        max_num_seqs=seqs,
        max_model_len=max_len,
        device=device,
        enforce_eager=enforce_eager,
        max_num_batched_tokens=batched,
        decode_steps=decode_steps,
    )
    return dict(
        name=spec.name,
        source=spec.source,
        arch=arch,
        dtype=dtype,
        params=arch.num_params(),
        weight_bytes=arch.weight_bytes(dtype) + estimates.packed_head_bytes(arch, dtype, device),
        kv_bytes_per_token=per_token,
        tokens_per_block=tokens_per_block,
        priority=spec.priority,
        max_model_len=max_len,
        max_num_seqs=seqs,
        max_num_batched_tokens=batched,
        activation_bytes=act,
        graph_bytes=graphs,
    )


def plan_memory(
    specs: Sequence[ModelSpec],
    archs: Mapping[str, ArchConfig],
    *,
    device: str,
    budget: str | int | float | None,
    total_device_bytes: int | None,
    policy: str = "shared",
    enforce_eager: bool = False,
    decode_steps: int = estimates.DECODE_STEPS,
) -> MemoryPlan:
    """Plan the device memory of ``specs`` (``archs`` maps model name -> ArchConfig).

    ``budget``: absolute (``"32GiB"``, bytes) or a fraction of ``total_device_bytes`` (the
    device's TOTAL memory, as vLLM v1 reads ``--gpu-memory-utilization``). ``None``: on CUDA 0.9 x
    total; on CPU the fixed terms plus a KV pool that holds every model's ``max_num_seqs`` sequences
    of ``max_model_len`` tokens, that pool capped at 4 GiB (``CPU_DEFAULT_KV_CAP_BYTES``) so a
    default CPU plan stays within a laptop's RAM. ``decode_steps``: the CUDA graphs' greedy
    decode steps per multi-step graph (``estimates.graph_bytes``).
    Raises ConfigError for invalid inputs; a plan that does not fit is returned with ``fits=False``.
    """
    if device not in DEVICES:
        raise ConfigError(
            f"device must be one of {', '.join(DEVICES)}, got {device!r}", key="device"
        )
    if policy not in POLICIES:
        raise ConfigError(
            f"policy must be one of {', '.join(POLICIES)}, got {policy!r}", key="policy"
        )
    if not specs:
        raise ConfigError("no models to plan: add at least one entry under models", key="models")
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"model names must be unique; repeated: {', '.join(dupes)}", key="name")
    missing = [n for n in names if n not in archs]
    if missing:
        raise ConfigError(f"no architecture for model(s) {', '.join(missing)}", key="source")

    per_token = [
        archs[s.name].kv_bytes_per_token(resolve_dtype(s.dtype, archs[s.name], device))
        for s in specs
    ]
    block_bytes = choose_block_bytes(per_token)
    fields = [_resolve_model(s, archs[s.name], device, block_bytes, enforce_eager, decode_steps)
              for s in specs]

    weights = sum(f["weight_bytes"] for f in fields)
    activation = max(f["activation_bytes"] for f in fields)
    graphs = sum(f["graph_bytes"] for f in fields)
    overhead = estimates.overhead_bytes(device)
    fixed = weights + activation + graphs + overhead

    if budget is None:
        if device == "cuda":
            if total_device_bytes is None:
                raise ConfigError(
                    "memory: no budget given and the GPU's total memory is unknown; "
                    "set memory (e.g. 20GiB)",
                    key="memory",
                )
            budget_bytes = int(0.9 * total_device_bytes)
        else:
            want_blocks = sum(
                f["max_num_seqs"] * -(-f["max_model_len"] // f["tokens_per_block"]) for f in fields
            )
            kv_cap = estimates.CPU_DEFAULT_KV_CAP_BYTES // block_bytes
            budget_bytes = fixed + min(want_blocks, kv_cap) * block_bytes
    else:
        budget_bytes = parse_memory(budget, total_device_bytes, key="memory")

    free = budget_bytes - fixed
    num_blocks = max(0, free) // block_bytes

    if policy == "shared":
        for f, spec in zip(fields, specs, strict=True):
            t = f["tokens_per_block"]
            f["min_blocks"] = -(-spec.kv_min_tokens // t)
            f["max_blocks"] = None if spec.kv_max_tokens is None else -(-spec.kv_max_tokens // t)
    else:
        shares = _static_shares(
            [f["max_num_seqs"] * f["max_model_len"] * f["kv_bytes_per_token"] for f in fields],
            num_blocks,
        )
        for f, share in zip(fields, shares, strict=True):
            f["min_blocks"] = f["max_blocks"] = share

    provisional = [ModelPlan(**f, max_seqs_at_max_len=0) for f in fields]
    models = tuple(
        ModelPlan(
            **f,
            max_seqs_at_max_len=reachable_blocks(m, provisional, num_blocks) // m.blocks_per_seq,
        )
        for f, m in zip(fields, provisional, strict=True)
    )
    problem = find_problem(
        models,
        budget_bytes,
        total_device_bytes,
        free,
        num_blocks,
        block_bytes,
        dict(weights=weights, activations=activation, graphs=graphs, overhead=overhead),
        policy,
    )
    return MemoryPlan(
        device=device,
        policy=policy,
        budget_bytes=budget_bytes,
        weights_bytes=weights,
        activation_bytes=activation,
        graph_bytes=graphs,
        overhead_bytes=overhead,
        kv_pool_bytes=num_blocks * block_bytes,
        block_bytes=block_bytes,
        num_blocks=num_blocks,
        models=models,
        fits=problem is None,
        problem=problem,
    )


__all__ = ["MemoryPlan", "ModelPlan", "plan_memory", "resolve_dtype", "GiB"]
