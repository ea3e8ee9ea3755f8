"""A MemoryPlan as text tables (``modelhive plan``) and as JSON with stable keys (for scripts).

Stable JSON keys: top level ``budget_bytes``, ``kv_pool_bytes``, ``fits``, ``models``; per model
``name``, ``params``, ``weight_bytes``, ``kv_bytes_per_token``, ``tokens_per_block``,
``max_seqs_at_max_len``. Other keys may be added, never renamed.
"""

from __future__ import annotations

from dataclasses import dataclass

from modelhive.planner.memory import MemoryPlan, ModelPlan


@dataclass(frozen=True)
class PolicyRow:
    """KV one model can use when the others are idle, under each policy."""

    name: str
    max_model_len: int
    static_tokens: int
    static_seqs: int
    shared_tokens: int
    shared_seqs: int


def _gb(num_bytes: int) -> str:
    return f"{num_bytes / 1e9:.2f} GB"


def _pct(num_bytes: int, budget: int) -> str:
    return f"{100 * num_bytes / budget:.1f} %" if budget else "-"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.0f} M"


def _table(header: list[str], rows: list[list[str]], left: tuple[int, ...] = (0,)) -> list[str]:
    """Columns padded to their widest cell; columns in ``left`` left-aligned, the rest right."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def fmt(row: list[str]) -> str:
        cells = zip(row, widths, strict=True)
        return "  ".join(c.ljust(w) if i in left else c.rjust(w)
                         for i, (c, w) in enumerate(cells)).rstrip()

    return [fmt(header), *[fmt(r) for r in rows]]


def kv_tokens_alone(plan: MemoryPlan, m: ModelPlan) -> int:
    """KV tokens ``m`` can hold when every other model is idle (their guarantees stay reserved)."""
    return plan.reachable_blocks(m.name) * m.tokens_per_block


def policy_rows(shared: MemoryPlan, static: MemoryPlan) -> list[PolicyRow]:
    """The same models planned under both policies, side by side."""
    rows = []
    for m in shared.models:
        s = static.model(m.name)
        rows.append(PolicyRow(m.name, m.max_model_len, kv_tokens_alone(static, s),
                              s.max_seqs_at_max_len, kv_tokens_alone(shared, m),
                              m.max_seqs_at_max_len))
    return rows


def format_plan(plan: MemoryPlan, compare: MemoryPlan | None = None) -> str:
    """The plan as a table; with ``compare`` (the other policy's plan) also static vs shared."""
    b = plan.budget_bytes
    lines = [f"memory plan: device {plan.device}, policy {plan.policy}, budget {_gb(b)} "
             f"({b / 2**30:.2f} GiB)", ""]
    header = ["MODEL", "PARAMS", "DTYPE", "WEIGHTS", "% BUDGET", "KV B/TOKEN", "TOK/BLOCK",
              "BLOCKS GUAR.", "MAX SEQS @ LEN", "ACTIVATION", "GRAPHS"]
    rows = [[m.name, _count(m.params), m.dtype, _gb(m.weight_bytes), _pct(m.weight_bytes, b),
             f"{m.kv_bytes_per_token:,}", str(m.tokens_per_block),
             f"{m.min_blocks:,}" + ("" if m.max_blocks is None else f" (cap {m.max_blocks:,})"),
             f"{m.max_seqs_at_max_len:,} @ {m.max_model_len}", _gb(m.activation_bytes),
             _gb(m.graph_bytes)] for m in plan.models]
    lines += _table(header, rows)
    lines += ["", *_table(["TERM", "BYTES", "% BUDGET", ""], [
        ["weights", _gb(plan.weights_bytes), _pct(plan.weights_bytes, b), "exact, sum"],
        ["activation peak", _gb(plan.activation_bytes), _pct(plan.activation_bytes, b),
         "upper bound, max over models"],
        ["CUDA graphs", _gb(plan.graph_bytes), _pct(plan.graph_bytes, b), "estimate, sum"],
        ["overhead", _gb(plan.overhead_bytes), _pct(plan.overhead_bytes, b), "CUDA context"],
        ["KV pool", _gb(plan.kv_pool_bytes), _pct(plan.kv_pool_bytes, b),
         f"{plan.num_blocks:,} blocks x {plan.block_bytes:,} B"],
        ["budget", _gb(b), "100.0 %", ""],
    ], left=(0, 3))]
    if compare is not None:
        shared, static = (plan, compare) if plan.policy == "shared" else (compare, plan)
        lines += ["", "KV each model can use while the others are idle:"]
        lines += _table(
            ["MODEL", "STATIC SPLIT TOKENS", "SEQS", "SHARED POOL TOKENS", "SEQS", "GAIN"],
            [[r.name, f"{r.static_tokens:,}", f"{r.static_seqs:,}", f"{r.shared_tokens:,}",
              f"{r.shared_seqs:,}",
              f"{r.shared_tokens / r.static_tokens:.1f}x" if r.static_tokens else "-"]
             for r in policy_rows(shared, static)])
    lines += ["", "fits" if plan.fits else f"does NOT fit: {plan.problem}"]
    return "\n".join(lines)


def plan_to_dict(plan: MemoryPlan, compare: MemoryPlan | None = None) -> dict:
    """JSON-ready dict (stable keys listed in the module docstring)."""
    models = []
    for m in plan.models:
        entry = {
            "name": m.name, "source": m.source, "arch": m.arch.arch, "dtype": m.dtype,
            "params": m.params, "weight_bytes": m.weight_bytes,
            "kv_bytes_per_token": m.kv_bytes_per_token, "tokens_per_block": m.tokens_per_block,
            "min_blocks": m.min_blocks, "max_blocks": m.max_blocks, "priority": m.priority,
            "max_model_len": m.max_model_len, "max_num_seqs": m.max_num_seqs,
            "max_num_batched_tokens": m.max_num_batched_tokens,
            "activation_bytes": m.activation_bytes, "graph_bytes": m.graph_bytes,
            "max_seqs_at_max_len": m.max_seqs_at_max_len,
            "kv_tokens_alone": kv_tokens_alone(plan, m),
        }
        models.append(entry)
    out = {
        "device": plan.device, "policy": plan.policy, "budget_bytes": plan.budget_bytes,
        "weights_bytes": plan.weights_bytes, "activation_bytes": plan.activation_bytes,
        "graph_bytes": plan.graph_bytes, "overhead_bytes": plan.overhead_bytes,
        "kv_pool_bytes": plan.kv_pool_bytes, "block_bytes": plan.block_bytes,
        "num_blocks": plan.num_blocks, "fits": plan.fits, "problem": plan.problem,
        "models": models,
    }
    if compare is not None:
        shared, static = (plan, compare) if plan.policy == "shared" else (compare, plan)
        out["policy_comparison"] = [r.__dict__ for r in policy_rows(shared, static)]
    return out
