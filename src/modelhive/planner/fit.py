"""Does a plan fit? One sentence naming the term that overflows, by how much, and what to change."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from modelhive.planner.memory import ModelPlan


def gb(num_bytes: int | float) -> str:
    """Bytes as decimal gigabytes with two decimals (the unit nvidia-smi users compare with)."""
    return f"{num_bytes / 1e9:.2f} GB"


def reachable_blocks(m: ModelPlan, models: Sequence[ModelPlan], num_blocks: int) -> int:
    """Blocks ``m`` can use when every other model is idle (their minimums stay reserved)."""
    others_min = sum(o.min_blocks for o in models if o.name != m.name)
    reach = max(0, num_blocks - others_min)
    return reach if m.max_blocks is None else min(reach, m.max_blocks)


_TERM_NAMES = {
    "weights": "the weights",
    "activations": "the activation peak",
    "graphs": "the CUDA graphs",
    "overhead": "the CUDA context overhead",
}
_TERM_FIXES = {
    "weights": "serve fewer or smaller models",
    "activations": "lower max_num_batched_tokens or max_num_seqs",
    "graphs": "set enforce_eager or lower max_num_seqs",
    "overhead": "use a device with more memory",
}


def find_problem(
    models: Sequence[ModelPlan],
    budget: int,
    total: int | None,
    free: int,
    num_blocks: int,
    block_bytes: int,
    terms: dict[str, int],
    policy: str,
) -> str | None:
    if total is not None and budget > total:
        return (
            f"the budget of {gb(budget)} exceeds the device's total memory of {gb(total)} by "
            f"{gb(budget - total)}; lower memory to at most {gb(total)}"
        )
    if free < 0:
        biggest = max(terms, key=lambda k: terms[k])
        fix = _TERM_FIXES[biggest]
        if biggest == "weights" and any(m.dtype == "float32" for m in models):
            fix += " (or dtype bfloat16, half the bytes of float32)"
        return (
            f"the fixed terms exceed the budget of {gb(budget)} by {gb(-free)}, leaving nothing "
            f"for the KV pool; the largest is {_TERM_NAMES[biggest]} ({gb(terms[biggest])}): "
            f"raise memory by at least {gb(-free)} or {fix}"
        )
    guaranteed = sum(m.min_blocks for m in models)
    if policy == "shared" and guaranteed > num_blocks:
        short = (guaranteed - num_blocks) * block_bytes
        return (
            f"the guaranteed KV minimums (kv_min_tokens) need {guaranteed} blocks but the KV pool "
            f"has {num_blocks}, short by {gb(short)}; lower kv_min_tokens or raise memory by "
            f"{gb(short)}"
        )
    for m in models:
        reach = reachable_blocks(m, models, num_blocks)
        if reach < m.blocks_per_seq:
            reach_tokens = reach * m.tokens_per_block
            short = (m.blocks_per_seq - reach) * block_bytes
            why = (
                "its kv_max_tokens cap"
                if m.max_blocks is not None
                and m.max_blocks < m.blocks_per_seq
                and policy == "shared"
                else "the KV pool"
            )
            return (
                f"model {m.name}: {why} holds {reach_tokens} tokens, less than one sequence of "
                f"max_model_len {m.max_model_len}; lower max_model_len to {reach_tokens} or "
                f"raise memory by {gb(short)}"
            )
    return None
