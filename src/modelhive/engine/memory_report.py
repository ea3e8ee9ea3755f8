"""Measured memory, set beside the plan: what loading and running really took.

Two moments:

- **While ``build_engine`` loads** (``MemoryProbe``), per model:
  ``param_bytes`` (sum of ``numel x element_size`` of its parameters), ``load_bytes`` (what
  ``load_model`` added: torch ``memory_allocated`` delta on CUDA, RSS delta on CPU), and
  ``activation_bytes``: the peak of one dry step at the model's token budget
  (``max_num_batched_tokens`` tokens over ``max_num_seqs`` prefilling sequences that all sample,
  the worst step the scheduler can build). The dry step runs **after** the KV pool is allocated,
  on the model's real runner, writing scratch K/V into pool blocks that no sequence owns yet: the
  plan is exact up front, so nothing is sized from this number; running it with the pool in place
  makes a too-small activation estimate fail at start-up (``PlanError``) instead of under load, and
  leaves the allocator cache as it will be in steady state. On CUDA one warm-up step first (Triton
  compilation, cuBLAS handles and workspaces), then the measured one. On CUDA the peak is
  ``max_memory_allocated`` after ``reset_peak_memory_stats`` minus ``memory_allocated`` before the
  step; on CPU it is the growth of the peak RSS (``VmHWM``, reset through
  ``/proc/self/clear_refs``), or None where that file cannot be written, after a one-token
  warm-up step (the libraries' one-time state) and with the C heap's free pages handed back
  (``release_free_heap``): a tiny model read 7.6 MiB against a 3.1 MiB plan without them, 1.3
  MiB with them.
- **Any time later** (``measure_memory(engine)``, for ``modelhive ps`` and ``/metrics``): the KV
  pool's bytes, the CUDA graphs (caching-allocator segments owned by a graph pool, plus the
  growth of the process's non-torch memory since ``build_engine`` returned: graph executables
  and the decode kernels loaded to capture them; read whoever captured the graphs; None when no
  runner has graphs), torch ``memory_allocated`` /
  ``memory_reserved``, the process's device memory from NVML (``nvmlDeviceGetComputeRunningProcesses``
  entry whose pid is ours; None without ``nvidia-ml-py`` or when the driver does not report it),
  and the process RSS.

``compare(plan, measured)`` lines the terms up with the plan's (bytes; a term is None where it
was not measured). Units are bytes throughout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from modelhive.engine.device_memory import (
    _cuda_index,
    _proc_status,
    _reset_peak_rss,
    graph_pool_bytes,
    nvml_process_bytes,
    release_free_heap,
    rss_bytes,
)
from modelhive.engine.sequence import ModelBatch, ScheduledSeq
from modelhive.errors import PlanError
from modelhive.planner.memory import MemoryPlan
from modelhive.sampling_params import SamplingParams

log = logging.getLogger("modelhive.memory")

#: hive-wide terms, in the plan's order; "process" is set against the plan's budget
TERMS = ("weights", "activation", "graphs", "overhead", "kv_pool", "process")
#: per-model terms
MODEL_TERMS = ("weights", "activation", "graphs")


# ----------------------------------------------------------------------- measurements
@dataclass(frozen=True)
class ModelMemory:
    """What loading one model took (bytes)."""

    name: str
    param_bytes: int
    #: growth across ``load_model``: torch allocator on CUDA, RSS on CPU
    load_bytes: int | None
    #: peak of the dry step above what was allocated before it; None where not measured
    activation_bytes: int | None
    device_type: str = "cpu"

    @property
    def weight_bytes(self) -> int:
        """The weights term: the allocator's growth on CUDA (exact up to its 512-byte rounding),
        the parameter bytes on CPU (the RSS delta there carries allocator noise)."""
        if self.device_type == "cuda" and self.load_bytes is not None:
            return self.load_bytes
        return self.param_bytes


@dataclass(frozen=True)
class LoadMemory:
    """What ``build_engine`` measured (``engine.load_memory``)."""

    models: tuple[ModelMemory, ...]
    #: NVML process bytes minus torch reserved when ``build_engine`` returned (CUDA context and
    #: libraries); later growth of it with graphs captured is counted as graph memory
    non_torch_bytes: int | None = None


@dataclass(frozen=True)
class MeasuredMemory:
    """One reading of the whole process, plus the load-time numbers of every model."""

    device: str  # "cpu" | "cuda:N"
    models: tuple[ModelMemory, ...]
    kv_pool_bytes: int
    #: CUDA graphs of all models (one shared pool + non-torch growth); None: none captured
    graph_bytes: int | None
    torch_allocated_bytes: int | None
    torch_reserved_bytes: int | None
    nvml_process_bytes: int | None
    rss_bytes: int

    def model(self, name: str) -> ModelMemory:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)

    @property
    def weights_bytes(self) -> int:
        return sum(m.weight_bytes for m in self.models)

    @property
    def activation_bytes(self) -> int | None:
        """Max over models (they run one after another), as in the plan."""
        peaks = [m.activation_bytes for m in self.models if m.activation_bytes is not None]
        return max(peaks) if peaks else None

    @property
    def process_bytes(self) -> int | None:
        """The process's device memory: NVML's per-process figure, else torch's reserved
        (which lacks the CUDA context) on CUDA; the RSS on CPU."""
        if self.device.startswith("cuda"):
            return self.nvml_process_bytes if self.nvml_process_bytes is not None \
                else self.torch_reserved_bytes
        return self.rss_bytes

    @property
    def overhead_bytes(self) -> int | None:
        """Everything in the process that is none of the other terms (CUDA context, cuBLAS
        workspaces, allocator cache slack, Triton modules; on CPU the Python and torch runtime)."""
        process = self.process_bytes
        if process is None:
            return None
        return (process - self.weights_bytes - self.kv_pool_bytes - (self.graph_bytes or 0)
                - (self.activation_bytes or 0))

    def terms(self) -> dict[str, int | None]:
        return {"weights": self.weights_bytes, "activation": self.activation_bytes,
                "graphs": self.graph_bytes, "overhead": self.overhead_bytes,
                "kv_pool": self.kv_pool_bytes, "process": self.process_bytes}

    def model_terms(self, name: str) -> dict[str, int | None]:
        m = self.model(name)
        # graphs: one pool for all models, so not attributable per model after the fact
        return {"weights": m.weight_bytes, "activation": m.activation_bytes, "graphs": None}


def planned_terms(plan: MemoryPlan) -> dict[str, int]:
    """The plan's hive-wide terms under ``TERMS`` names (``process`` = the budget)."""
    return {"weights": plan.weights_bytes, "activation": plan.activation_bytes,
            "graphs": plan.graph_bytes, "overhead": plan.overhead_bytes,
            "kv_pool": plan.kv_pool_bytes, "process": plan.budget_bytes}


def planned_model_terms(plan: MemoryPlan, name: str) -> dict[str, int]:
    m = plan.model(name)
    return {"weights": m.weight_bytes, "activation": m.activation_bytes, "graphs": m.graph_bytes}


@dataclass(frozen=True)
class TermComparison:
    term: str
    planned: int
    measured: int | None

    @property
    def diff_pct(self) -> float | None:
        """(measured - planned) / planned in percent; None when unmeasured or planned is 0."""
        if self.measured is None or not self.planned:
            return None
        return 100.0 * (self.measured - self.planned) / self.planned


def compare(plan: MemoryPlan, measured: MeasuredMemory) -> list[TermComparison]:
    got = measured.terms()
    return [TermComparison(t, p, got[t]) for t, p in planned_terms(plan).items()]


# ------------------------------------------------------------------------- load probe
def dry_step_batch(model: str, max_num_batched_tokens: int, max_num_seqs: int,
                   max_model_len: int, tokens_per_block: int, num_blocks: int,
                   vocab_size: int) -> ModelBatch:
    """The worst step the scheduler can build for one model: ``max_num_batched_tokens`` tokens
    (fewer only if ``max_num_seqs x (max_model_len - 1)`` cannot hold them) as
    ``min(max_num_seqs, tokens)`` prefills that all sample, through the sampler's costliest
    path (penalties, top-p, min-p, logprobs: ``planner.estimates.sampler_bytes``). Block ids
    wrap around the pool (``num_blocks``): the K/V written are scratch, no sequence owns a block
    yet."""
    num_seqs = max(1, min(max_num_seqs, max_num_batched_tokens))
    per_seq_cap = max(1, max_model_len - 1)
    total = min(max_num_batched_tokens, num_seqs * per_seq_cap)
    base, extra = divmod(total, num_seqs)
    params = SamplingParams(max_tokens=1, top_p=0.9, min_p=0.01, repetition_penalty=1.1,
                            logprobs=5)
    seqs = []
    next_block = 0
    for i in range(num_seqs):
        n = base + (1 if i < extra else 0)
        if n == 0:
            break
        blocks = -(-n // tokens_per_block)
        table = tuple((next_block + b) % num_blocks for b in range(blocks))
        next_block += blocks
        ids = tuple(1 + (i * 131 + j) % (vocab_size - 1) for j in range(n))
        seqs.append(ScheduledSeq(seq_id=f"dry-{i}", token_ids=ids, num_cached=0,
                                 block_table=table, sample=True, params=params, num_generated=0,
                                 history=ids, num_prompt_tokens=n))
    return ModelBatch(model, tuple(seqs))


def _one_token(batch: ModelBatch) -> ModelBatch:
    """``batch``'s first sequence cut to its first token (a warm-up step that costs nothing)."""
    seq = batch.seqs[0]
    return ModelBatch(batch.model, (dataclasses.replace(seq, token_ids=seq.token_ids[:1],
                                                        block_table=seq.block_table[:1]),))


@dataclass
class MemoryProbe:
    """Collects ``ModelMemory`` while ``build_engine`` loads (see the module docstring)."""

    device: torch.device
    _models: dict[str, dict] = field(default_factory=dict)

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def _allocated(self) -> int:
        if self.is_cuda:
            torch.cuda.synchronize(self.device)
            return torch.cuda.memory_allocated(self.device)
        gc.collect()
        return rss_bytes()

    @contextlib.contextmanager
    def loading(self, name: str) -> Iterator[None]:
        """Wrap ``load_model``; then call ``loaded(name, model)``."""
        before = self._allocated()
        yield
        self._models[name] = {"load_bytes": self._allocated() - before}

    def loaded(self, name: str, model: torch.nn.Module) -> None:
        self._models[name]["param_bytes"] = sum(p.numel() * p.element_size()
                                                for p in model.parameters())

    @torch.inference_mode()
    def dry_step(self, runner, batch: ModelBatch, planned_bytes: int) -> int | None:
        """Run ``batch`` on ``runner`` (on CUDA twice: warm-up, measured); the measured step's peak
        above what was allocated before it. Raises PlanError when it does not fit in device memory."""
        name = runner.name
        try:
            if self.is_cuda:
                runner.execute(batch)  # warm-up: kernels compile, library handles, workspaces
                torch.cuda.synchronize(self.device)
                base = torch.cuda.memory_allocated(self.device)
                torch.cuda.reset_peak_memory_stats(self.device)
                runner.execute(batch)
                torch.cuda.synchronize(self.device)
                peak = torch.cuda.max_memory_allocated(self.device) - base
            else:
                # warm-up on one token: the libraries' one-time state (OpenMP threads, oneDNN's
                # caches: ~7 MiB) is not the step's; then the heap's free pages go back, so the
                # RSS peak counts what the step itself touches
                runner.execute(_one_token(batch))
                gc.collect()
                release_free_heap()
                base = rss_bytes()
                if not _reset_peak_rss():
                    peak = None
                else:
                    runner.execute(batch)
                    peak = max(0, _proc_status("VmHWM") - base)
        except torch.cuda.OutOfMemoryError:
            raise PlanError(
                f"model {name}: a step of {batch.num_tokens} tokens ran out of device memory "
                f"(planned activation peak {planned_bytes / 2**20:.0f} MiB); lower its "
                "max_num_batched_tokens or the memory budget") from None
        self._models[name]["activation_bytes"] = peak
        if peak is not None and peak > planned_bytes:
            log.warning("model %s: measured activation peak %.1f MiB exceeds the plan's %.1f MiB",
                        name, peak / 2**20, planned_bytes / 2**20)
        return peak

    def after_loads(self) -> None:
        """Give the allocator cache of the loads back (checkpoint tensors copied into fused
        parameters, random preset tensors): the plan holds no room for it, and the KV pool that
        comes next needs one contiguous range."""
        if self.is_cuda:
            torch.cuda.empty_cache()

    def result(self) -> LoadMemory:
        models = tuple(ModelMemory(name, m["param_bytes"], m.get("load_bytes"),
                                   m.get("activation_bytes"), self.device.type)
                       for name, m in self._models.items())
        non_torch = None
        if self.is_cuda:
            dev = _cuda_index(self.device)
            nvml = nvml_process_bytes(dev)
            if nvml is not None:
                non_torch = nvml - torch.cuda.memory_reserved(dev)
        return LoadMemory(models, non_torch)


# ------------------------------------------------------------------- whole-process reading
def measure_memory(engine) -> MeasuredMemory:
    """Read the process now (cheap: allocator counters, one NVML query, one allocator snapshot
    when graphs exist); the per-model numbers come from the load (``engine.load_memory``,
    set by ``build_engine``; parameter bytes only if the engine was built another way)."""
    load = getattr(engine, "load_memory", None)
    if load is None:
        load = LoadMemory(tuple(ModelMemory(name, sum(p.numel() * p.element_size()
                                                      for p in m.runner.model.parameters()),
                                            None, None, engine.device.type)
                                for name, m in engine.models.items()))
    device = engine.device
    if device.type == "cuda":
        dev = _cuda_index(device)
        reserved = torch.cuda.memory_reserved(dev)
        nvml = nvml_process_bytes(dev)
        graphs = None
        if any(getattr(m.runner, "decode_graphs", None) is not None
               for m in engine.models.values()):
            graphs = graph_pool_bytes(dev)
            if nvml is not None and load.non_torch_bytes is not None:
                graphs += max(0, nvml - reserved - load.non_torch_bytes)
        return MeasuredMemory(
            device=str(dev), models=load.models, kv_pool_bytes=engine.pool.nbytes,
            graph_bytes=graphs, torch_allocated_bytes=torch.cuda.memory_allocated(dev),
            torch_reserved_bytes=reserved, nvml_process_bytes=nvml, rss_bytes=rss_bytes())
    return MeasuredMemory(device="cpu", models=load.models, kv_pool_bytes=engine.pool.nbytes,
                          graph_bytes=None, torch_allocated_bytes=None, torch_reserved_bytes=None,
                          nvml_process_bytes=None, rss_bytes=rss_bytes())
