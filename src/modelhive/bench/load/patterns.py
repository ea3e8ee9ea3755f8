"""Workloads for ``modelhive bench serve``: when each request is sent, to which model, how long.

A ``Workload`` is a frozen description; ``build_requests`` turns it into the exact list of
``PlannedRequest``s with a seeded RNG, so two runs (say ``static`` and ``shared``) see the same
traffic. Arrivals are a Poisson process (exponential gaps, mean ``1 / request_rate``) or a fixed
rate; ``request_rate = inf`` sends everything at t = 0.

Patterns (how the model of each request is drawn):

- ``uniform``: every model equally likely, or in proportion to ``mix`` when given.
- ``skewed``: ``hot_fraction`` (80 %) of requests to ``hot_model`` (default: the first model), the
  rest split evenly among the others.
- ``bursty``: models active in turns: time is cut into turns of ``burst_period_s`` seconds and
  every request sent in turn k goes to model ``k mod M``. Each model thus sees the whole arrival
  rate for a while, then nothing: the intermittent peaks that a static split handles worst.

Lengths are uniform integers in ``[low, high]``: prompt lengths in tokens (``prompt_kind="ids"``:
random ids in ``token_id_range``, exact) or in words (``"text"``: random words, tokenized by the
server, so the token count is approximate); output lengths are sent as ``max_tokens`` with
``ignore_eos`` so every completed request produces exactly that many tokens.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field

PATTERNS = ("uniform", "skewed", "bursty")
ARRIVALS = ("poisson", "fixed")
PROMPT_KINDS = ("ids", "text")

#: words of the ``text`` prompts (plain lowercase words tokenize alike in most vocabularies)
WORDS = ("the", "model", "pool", "block", "token", "memory", "share", "river", "stone", "light",
         "house", "water", "green", "quick", "slow", "north", "south", "paper", "music", "garden",
         "window", "market", "winter", "summer", "number", "letter", "table", "chair", "cloud",
         "field", "engine", "signal")


@dataclass(frozen=True)
class PlannedRequest:
    """One request of a workload. ``send_at``: seconds after the run starts."""

    index: int
    model: str
    send_at: float
    prompt: list[int] | str
    prompt_len: int  # tokens (ids) or words (text)
    max_tokens: int


@dataclass(frozen=True)
class Workload:
    models: tuple[str, ...]
    pattern: str = "uniform"
    num_requests: int = 100
    request_rate: float = 10.0  # requests per second, all models together; inf: all at t = 0
    arrival: str = "poisson"
    prompt_len: tuple[int, int] = (32, 128)
    output_len: tuple[int, int] = (16, 64)
    prompt_kind: str = "ids"
    token_id_range: tuple[int, int] = (10, 500)  # [low, high): valid ids for every tiny preset
    mix: Mapping[str, float] | None = field(default=None, hash=False)
    hot_model: str | None = None
    hot_fraction: float = 0.8
    burst_period_s: float = 2.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("a workload needs at least one model")
        if self.pattern not in PATTERNS:
            raise ValueError(f"pattern must be one of {', '.join(PATTERNS)}, got {self.pattern!r}")
        if self.arrival not in ARRIVALS:
            raise ValueError(f"arrival must be one of {', '.join(ARRIVALS)}, got {self.arrival!r}")
        if self.prompt_kind not in PROMPT_KINDS:
            raise ValueError(f"prompt_kind must be one of {', '.join(PROMPT_KINDS)}")
        if self.num_requests < 1:
            raise ValueError("num_requests must be >= 1")
        if not self.request_rate > 0:
            raise ValueError("request_rate must be > 0 (inf: all at once)")
        for name, (low, high) in (("prompt_len", self.prompt_len),
                                  ("output_len", self.output_len)):
            if not 1 <= low <= high:
                raise ValueError(f"{name} must be 1 <= low <= high, got {low} {high}")
        if not 0 <= self.token_id_range[0] < self.token_id_range[1]:
            raise ValueError("token_id_range must be 0 <= low < high")
        if self.hot_model is not None and self.hot_model not in self.models:
            raise ValueError(f"hot_model {self.hot_model!r} is not one of {', '.join(self.models)}")
        if not 0 < self.hot_fraction <= 1:
            raise ValueError("hot_fraction must be in (0, 1]")
        if not self.burst_period_s > 0:
            raise ValueError("burst_period_s must be > 0")
        if self.mix is not None:
            unknown = sorted(set(self.mix) - set(self.models))
            if unknown:
                raise ValueError(f"mix names unknown model(s): {', '.join(unknown)}")
            if any(w < 0 for w in self.mix.values()) or not sum(self.mix.values()) > 0:
                raise ValueError("mix weights must be >= 0 and not all zero")

    def model_weights(self, t: float) -> dict[str, float]:
        """Probability of each model for a request sent ``t`` seconds into the run."""
        models = self.models
        if self.pattern == "bursty":
            active = models[int(t // self.burst_period_s) % len(models)]
            return {m: float(m == active) for m in models}
        if self.pattern == "skewed":
            hot = self.hot_model or models[0]
            if len(models) == 1:
                return {hot: 1.0}
            rest = (1.0 - self.hot_fraction) / (len(models) - 1)
            return {m: self.hot_fraction if m == hot else rest for m in models}
        if self.mix is not None:
            total = sum(self.mix.values())
            return {m: self.mix.get(m, 0.0) / total for m in models}
        return {m: 1.0 / len(models) for m in models}


def arrival_times(workload: Workload, rng: random.Random) -> list[float]:
    """Send times (s) of the workload's requests; the first at 0."""
    n, rate = workload.num_requests, workload.request_rate
    if math.isinf(rate):
        return [0.0] * n
    times, t = [], 0.0
    for i in range(n):
        if i:
            t += rng.expovariate(rate) if workload.arrival == "poisson" else 1.0 / rate
        times.append(t)
    return times


def make_prompt(workload: Workload, length: int, rng: random.Random) -> list[int] | str:
    if workload.prompt_kind == "ids":
        low, high = workload.token_id_range
        return [rng.randrange(low, high) for _ in range(length)]
    return " ".join(rng.choice(WORDS) for _ in range(length))


def build_requests(workload: Workload) -> list[PlannedRequest]:
    """The workload's requests in send order; the same ``seed`` gives the same list."""
    rng = random.Random(workload.seed)
    requests = []
    for index, send_at in enumerate(arrival_times(workload, rng)):
        weights = workload.model_weights(send_at)
        model = rng.choices(list(weights), weights=list(weights.values()))[0]
        prompt_len = rng.randint(*workload.prompt_len)
        max_tokens = rng.randint(*workload.output_len)
        requests.append(PlannedRequest(index, model, send_at,
                                       make_prompt(workload, prompt_len, rng),
                                       prompt_len, max_tokens))
    return requests


def parse_mix(text: str | None) -> dict[str, float] | None:
    """``"a=3,b=1"`` -> ``{"a": 3.0, "b": 1.0}``; None or empty -> None."""
    if not text:
        return None
    mix = {}
    for part in text.split(","):
        name, sep, weight = part.strip().rpartition("=")
        if not sep or not name:
            raise ValueError(f"--mix expects NAME=WEIGHT[,NAME=WEIGHT...], got {part!r}")
        mix[name] = float(weight)
    return mix
