"""Pool occupancy over time, from the server's ``/metrics`` (polled every ~100 ms), and its PNG.

Reads ``modelhive:kv_blocks_used{model_name}``, ``modelhive:kv_blocks_free``,
``modelhive:kv_blocks_total`` and the preemption counter ``modelhive:num_preemptions``.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import httpx

BLOCKS_USED = "modelhive:kv_blocks_used"
BLOCKS_FREE = "modelhive:kv_blocks_free"
BLOCKS_TOTAL = "modelhive:kv_blocks_total"
PREEMPTIONS = "modelhive:num_preemptions"


def parse_metrics(text: str) -> dict[str, dict[str, float]]:
    """Prometheus text -> ``{sample name: {model_name or "": value}}`` for the pool's metrics.

    Counters are keyed by their family name (``modelhive:num_preemptions``, without ``_total``).
    """
    from prometheus_client.parser import text_string_to_metric_families

    wanted = {BLOCKS_USED, BLOCKS_FREE, BLOCKS_TOTAL, PREEMPTIONS, PREEMPTIONS + "_total"}
    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name not in wanted:
                continue
            name = PREEMPTIONS if sample.name.startswith(PREEMPTIONS) else sample.name
            out.setdefault(name, {})[sample.labels.get("model_name", "")] = sample.value
    return out


async def scrape(client: httpx.AsyncClient, base_url: str) -> dict[str, dict[str, float]]:
    response = await client.get(base_url + "/metrics", timeout=10)
    response.raise_for_status()
    return parse_metrics(response.text)


@dataclass(frozen=True)
class OccupancySample:
    t: float  # seconds since the run started
    used: dict[str, int]  # blocks per model
    free: int


@dataclass
class Occupancy:
    """The samples of one run; ``total_blocks`` from the first scrape."""

    interval_s: float
    total_blocks: int = 0
    samples: list[OccupancySample] = field(default_factory=list)
    scrape_errors: int = 0

    def max_used(self, model: str) -> int:
        return max((s.used.get(model, 0) for s in self.samples), default=0)

    def max_total_used(self) -> int:
        return max((sum(s.used.values()) for s in self.samples), default=0)

    async def poll(self, client: httpx.AsyncClient, base_url: str, start: float,
                   stop: asyncio.Event) -> None:
        """Scrape every ``interval_s`` until ``stop`` is set (then once more)."""
        while True:
            tick = time.perf_counter()
            try:
                metrics = await scrape(client, base_url)
            except (httpx.HTTPError, ValueError):
                self.scrape_errors += 1
            else:
                self.total_blocks = int(metrics.get(BLOCKS_TOTAL, {}).get("", self.total_blocks))
                used = {m: int(v) for m, v in metrics.get(BLOCKS_USED, {}).items()}
                free = int(metrics.get(BLOCKS_FREE, {}).get("", 0))
                self.samples.append(OccupancySample(tick - start, used, free))
            if stop.is_set():
                return
            try:
                await asyncio.wait_for(stop.wait(),
                                       max(0.0, self.interval_s - (time.perf_counter() - tick)))
            except asyncio.TimeoutError:
                pass


def plot_occupancy(occupancy: Occupancy, path: str, title: str = "") -> bool:
    """Stacked blocks per model over time, with the pool size as a line. False without
    matplotlib or without samples."""
    if not occupancy.samples:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    models = sorted({m for s in occupancy.samples for m in s.used})
    times = [s.t for s in occupancy.samples]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.stackplot(times, *[[s.used.get(m, 0) for s in occupancy.samples] for m in models],
                 labels=models, alpha=0.85, step="post")
    if occupancy.total_blocks:
        ax.axhline(occupancy.total_blocks, color="black", linewidth=1, linestyle="--",
                   label=f"pool ({occupancy.total_blocks} blocks)")
    ax.set_xlabel("time since the first request (s)")
    ax.set_ylabel("KV pool blocks used")
    ax.set_title(title or "KV pool occupancy per model")
    ax.set_ylim(bottom=0)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
