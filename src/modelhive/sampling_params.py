"""SamplingParams: how one request picks its tokens (vLLM's names and defaults)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from modelhive.errors import InvalidRequestError

#: upper bound for ``logprobs`` (OpenAI allows up to 20 for chat top_logprobs)
MAX_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling settings. ``temperature=0`` is greedy; ``top_k<=0`` disables top-k.

    ``seed`` makes a sampled request reproducible whatever else shares its batch (and across
    preemption), and the same on CPU and GPU: the uniform of token i's draw is a hash of
    (seed, i) (``engine.sampler.uniforms``); choice j of ``n`` uses seed + j
    (``engine.choice_params``).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None  # number of top alternatives to return with each token
    #: logprobs of the prompt's tokens 1.. (each given the tokens before it), with this many top
    #: alternatives each (vLLM's ``prompt_logprobs``; ``echo`` with ``logprobs`` on /v1/completions)
    prompt_logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    n: int = 1
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop or ()))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        self._check()

    def _check(self) -> None:
        def bad(param: str, why: str) -> InvalidRequestError:
            return InvalidRequestError(f"{param} {why}", param=param)

        def finite(name: str) -> float:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise bad(name, f"must be a finite number, got {value!r}")
            return float(value)

        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise bad("max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.n, int) or not 1 <= self.n <= 16:
            raise bad("n", f"must be an integer in [1, 16], got {self.n!r}")
        if finite("temperature") < 0:
            raise bad("temperature", f"must be >= 0, got {self.temperature}")
        if not 0 < finite("top_p") <= 1:
            raise bad("top_p", f"must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < -1:
            raise bad("top_k", f"must be an integer >= -1 (0 or -1 disables it), got {self.top_k!r}")
        if not 0 <= finite("min_p") <= 1:
            raise bad("min_p", f"must be in [0, 1], got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= finite(name) <= 2:
                raise bad(name, f"must be in [-2, 2], got {getattr(self, name)}")
        if not 0 < finite("repetition_penalty") <= 10:
            raise bad("repetition_penalty", f"must be in (0, 10], got {self.repetition_penalty}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not -(2**63) <= self.seed < 2**64):
            raise bad("seed", f"must be a 64-bit integer, got {self.seed!r}")
        if self.top_k > 2**31:
            raise bad("top_k", f"must be at most {2**31} (0 or -1 disables it), got {self.top_k}")
        if self.max_tokens > 2**31:
            raise bad("max_tokens", f"must be at most {2**31}, got {self.max_tokens}")
        if self.logprobs is not None and (not isinstance(self.logprobs, int)
                                          or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise bad("logprobs", f"must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        if self.prompt_logprobs is not None and (
                isinstance(self.prompt_logprobs, bool) or not isinstance(self.prompt_logprobs, int)
                or not 0 <= self.prompt_logprobs <= MAX_LOGPROBS):
            raise bad("prompt_logprobs",
                      f"must be an integer in [0, {MAX_LOGPROBS}], got {self.prompt_logprobs!r}")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_tokens:
            raise bad("min_tokens", f"must be an integer in [0, max_tokens], got {self.min_tokens!r}")
        if len(self.stop) > 16 or any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", "must be at most 16 non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must be non-negative integers")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
