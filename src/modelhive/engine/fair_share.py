"""Splitting one step's token budget between models: weighted max-min fairness (water-filling).

Each model asks for ``demand`` tokens this step (its decodes plus pending prefill, capped by its
own ``max_num_batched_tokens``). The step budget is handed out in proportion to the models'
weights; a model that needs less than its share gives the rest back to the others (work
conserving). So a flood of long prompts to one model can take at most its weighted share of a
step while other models have work, which bounds their time-to-first-token and inter-token
latency, and takes the whole step when it is alone.
"""

from __future__ import annotations


def fair_allowances(demand: dict[str, int], weights: dict[str, float], budget: int) -> dict[str, int]:
    """Tokens each model may use this step. Every model with demand gets at least one token."""
    alloc = {m: 0.0 for m in demand}
    open_models = {m for m, d in demand.items() if d > 0}
    remaining = float(budget)
    while remaining > 1e-9 and open_models:
        total_weight = sum(weights[m] for m in open_models)
        filled = set()
        handed = 0.0
        for m in open_models:
            give = min(remaining * weights[m] / total_weight, demand[m] - alloc[m])
            alloc[m] += give
            handed += give
            if alloc[m] >= demand[m] - 1e-9:
                filled.add(m)
        remaining -= handed
        if not filled:
            break  # everyone took a full share: the budget is spent
        open_models -= filled
    return {m: (max(1, int(a)) if demand[m] > 0 else 0) for m, a in alloc.items()}
