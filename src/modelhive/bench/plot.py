"""Optional PNG of a benchmark run (skipped, with a note, when matplotlib is missing)."""

from __future__ import annotations


def plot_results(results: list[dict], path: str) -> bool:
    """Bar chart: our tok/s (or ms per reply) next to transformers', per benchmark row."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    labels, ours, theirs, unit = [], [], [], []
    for r in results:
        if r["bench"] == "latency":
            labels.append(f"{r['model'].split(':')[-1]}\nbatch {r['batch']}")
            ours.append(r["decode_tok_s"])
            theirs.append(r.get("hf_tok_s", 0.0))
            unit.append("tok/s")
        elif r["bench"] == "throughput":
            labels.append(f"{r['model'].split(':')[-1]}\nthroughput")
            ours.append(r["tok_s"])
            theirs.append(r.get("hf_tok_s", 0.0))
            unit.append("tok/s")
        else:
            for m, e in r["per_model"].items():
                labels.append(f"{m.split(':')[-1]}\n10-token reply")
                ours.append(1e3 / e["ms_per_reply"])
                theirs.append(1e3 / e["hf_ms_per_reply"] if e.get("hf_ms_per_reply") else 0.0)
                unit.append("replies/s")
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(labels)), 4))
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], ours, 0.4, label="modelhive")
    ax.bar([x + 0.2 for x in xs], theirs, 0.4, label="transformers generate")
    ax.set_xticks(list(xs), labels, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel(" / ".join(sorted(set(unit))))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
