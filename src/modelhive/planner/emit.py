"""For people who stay on vLLM: one `vllm serve` per model, sized by vLLM v1's real memory rule.

vLLM v1 (0.10) per instance: ``requested = total x --gpu-memory-utilization`` where ``total`` is
the device's TOTAL memory, and ``KV = requested - weights - activation peak - non-torch increase``
measured by a profile run. The CUDA context (made before the baseline snapshot) and the CUDA graphs
(captured after the KV cache) are outside ``requested``. So for N instances on one device:

    sum_m (util_m x total + context + graphs_m) <= min(budget, (1 - DEVICE_HEADROOM) x total)

The KV left after every instance's fixed costs is split like the static policy (proportional to
``max_num_seqs x max_model_len x kv_bytes_per_token``), and ``util_m`` is the smallest 4-decimal
fraction whose ``requested`` holds that share (rounded down, so the sum never exceeds the device).
Instances start one at a time: each measures free memory at start-up, and one that loads while
another profiles counts the other's allocations as its own non-torch memory (see kvcached #193).
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Mapping
from dataclasses import dataclass

from modelhive.errors import PlanError
from modelhive.planner.estimates import MiB, graph_bytes
from modelhive.planner.memory import MemoryPlan, ModelPlan

VLLM_IMAGE = "vllm/vllm-openai:v0.10.1.1"
#: RTX 5090 as torch.cuda.mem_get_info and nvidia-smi report it: 32,607 MiB (the "32.6 GB" of the
#: three-container setup in REFERENCE.md). The default device for ``--emit`` without a GPU.
DEFAULT_TOTAL_BYTES = 32_607 * MiB
#: non-torch memory a vLLM profile run adds inside the budget (cuBLAS/NCCL workspaces); estimate.
VLLM_NON_TORCH_BYTES = 128 * MiB
#: CUDA context per process, outside the budget (the setup measured 0.4-0.9 GB with graphs).
#: vLLM's own estimate: modelhive's ``CUDA_OVERHEAD_BYTES`` also holds its allocator cache slack.
VLLM_CONTEXT_BYTES = 512 * MiB
#: share of the device left unplanned for the driver, a display and estimate error
DEVICE_HEADROOM = 0.02
UTIL_SCALE = 10_000  # 4 decimals
Ports = Mapping[str, int | None] | None  # model name -> port (default 8001, 8002, ...)
#: preset architectures -> the public checkpoint vLLM would load instead of random weights
PRESET_HF_IDS = {
    "tinyllama-1.1b": "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
    "qwen2.5-3b": "Qwen/Qwen2.5-3B-Instruct",
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B-Instruct",
    "yi-6b": "01-ai/Yi-6B-Chat",
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "qwen3-0.6b": "Qwen/Qwen3-0.6B",
    "gemma3-270m": "google/gemma-3-270m-it",
}


@dataclass(frozen=True)
class VllmInstance:
    """One vLLM server and the arithmetic behind its ``--gpu-memory-utilization`` (bytes)."""

    model: ModelPlan
    vllm_model: str
    port: int
    total_bytes: int
    util: float
    non_torch_bytes: int
    kv_bytes: int  # what vLLM will find for KV: util x total - weights - activation - non-torch
    outside_bytes: int  # CUDA context + graphs, not in util x total
    enforce_eager: bool

    @property
    def requested_bytes(self) -> int:
        return int(self.util * self.total_bytes)

    @property
    def kv_tokens(self) -> int:
        return self.kv_bytes // self.model.kv_bytes_per_token

    def args(self) -> list[str]:
        m = self.model
        args = [self.vllm_model, "--served-model-name", m.name, "--dtype", m.dtype,
                "--max-model-len", str(m.max_model_len), "--max-num-seqs", str(m.max_num_seqs),
                "--max-num-batched-tokens", str(m.max_num_batched_tokens),
                "--gpu-memory-utilization", f"{self.util:.4f}"]
        return args + (["--enforce-eager"] if self.enforce_eager else [])

    def arithmetic(self) -> list[str]:
        """Comment lines that show how ``util`` was derived."""
        m, g = self.model, (lambda b: f"{b / 1e9:.2f}")
        return [
            f"{m.name}: requested = {self.util:.4f} x {g(self.total_bytes)} GB total = "
            f"{g(self.requested_bytes)} GB",
            f"  = weights {g(m.weight_bytes)} + activation peak {g(m.activation_bytes)} + "
            f"non-torch {g(self.non_torch_bytes)} + KV {g(self.kv_bytes)} GB",
            f"  KV {self.kv_tokens:,} tokens = {self.kv_tokens // m.max_model_len} seqs of "
            f"{m.max_model_len}; or, vLLM >= 0.11: --kv-cache-memory-bytes {self.kv_bytes}",
            f"  outside util: CUDA context + graphs {g(self.outside_bytes)} GB -> expect "
            f"{g(self.requested_bytes + self.outside_bytes)} GB in nvidia-smi",
        ]


def vllm_model_name(source: str) -> str:
    """What `vllm serve` loads for a modelhive source (presets map to their public checkpoint)."""
    if source.startswith("preset:"):
        return PRESET_HF_IDS.get(source[len("preset:"):], source[len("preset:"):])
    return source


def _decode_graph_bytes(m: ModelPlan) -> int:
    """The graph memory of a vLLM instance of ``m``: our estimate for decode graphs only (its
    piecewise graphs keep no prefill-sized activations of their own, and no multi-step ones)."""
    if m.graph_bytes == 0:
        return 0
    return graph_bytes(m.arch, m.dtype, max_num_seqs=m.max_num_seqs,
                       max_model_len=m.max_model_len, device="cuda", enforce_eager=False,
                       decode_steps=1)


def vllm_instances(plan: MemoryPlan, total_bytes: int, *, ports: Ports = None,
                   enforce_eager: bool = False) -> list[VllmInstance]:
    """One instance per planned model, in start order (the config's order)."""
    if plan.device != "cuda":
        raise PlanError("vLLM output needs a CUDA plan; pass --device cuda")
    usable = min(plan.budget_bytes, int((1 - DEVICE_HEADROOM) * total_bytes))
    fixed = {m.name: m.weight_bytes + m.activation_bytes + VLLM_NON_TORCH_BYTES
             for m in plan.models}
    outside = {m.name: VLLM_CONTEXT_BYTES + _decode_graph_bytes(m) for m in plan.models}
    kv_total = usable - sum(fixed.values()) - sum(outside.values())
    if kv_total <= 0:
        raise PlanError(f"as {len(plan.models)} vLLM instances the weights, activations, contexts "
                        f"and graphs exceed {usable / 1e9:.2f} GB by {-kv_total / 1e9:.2f} GB; "
                        f"raise memory or serve fewer models per device")
    weights = {m.name: m.max_num_seqs * m.max_model_len * m.kv_bytes_per_token for m in plan.models}
    instances = []
    for i, m in enumerate(plan.models):
        share = kv_total * weights[m.name] // sum(weights.values())
        util = math.floor((fixed[m.name] + share) * UTIL_SCALE / total_bytes) / UTIL_SCALE
        kv_bytes = int(util * total_bytes) - fixed[m.name]
        if kv_bytes < m.max_model_len * m.kv_bytes_per_token:
            raise PlanError(f"model {m.name}: as a vLLM instance its KV share holds "
                            f"{max(0, kv_bytes) // m.kv_bytes_per_token} tokens, less than "
                            f"max_model_len {m.max_model_len}; lower max_model_len or raise memory")
        port = (ports or {}).get(m.name) or 8001 + i
        instances.append(VllmInstance(m, vllm_model_name(m.source), port, total_bytes, util,
                                      VLLM_NON_TORCH_BYTES, kv_bytes, outside[m.name],
                                      enforce_eager))
    return instances


def _header(plan: MemoryPlan, instances: list[VllmInstance], total_bytes: int) -> list[str]:
    utils = sum(x.util for x in instances)
    used = sum(x.requested_bytes + x.outside_bytes for x in instances)
    cap = int((1 - DEVICE_HEADROOM) * total_bytes)
    note = []
    if plan.budget_bytes > cap:
        note = [f"budget {plan.budget_bytes / 1e9:.2f} GB > {cap / 1e9:.2f} GB "
                f"({1 - DEVICE_HEADROOM:.0%} of the device): planned to the device instead."]
    return note + [
        f"vLLM v1 rule: requested = util x TOTAL device memory ({total_bytes / 1e9:.2f} GB) must "
        "hold weights + activation peak + non-torch + KV.",
        f"sum of utilizations {utils:.4f}; expected device use {used / 1e9:.2f} GB with contexts "
        "and graphs.",
        "Start one at a time: an engine starting while another profiles mis-measures free memory.",
    ]


def emit_vllm(plan: MemoryPlan, total_bytes: int, *, ports: Ports = None,
              enforce_eager: bool = False) -> str:
    """A bash script: one `vllm serve` per model, each started after the previous is healthy."""
    instances = vllm_instances(plan, total_bytes, ports=ports, enforce_eager=enforce_eager)
    lines = ["#!/usr/bin/env bash", *[f"# {h}" for h in _header(plan, instances, total_bytes)],
             "set -euo pipefail",
             'wait_healthy() { until curl -sf "http://localhost:$1/health" >/dev/null; do sleep 2;'
             " done; }", ""]
    for x in instances:
        lines += [f"# {c}" for c in x.arithmetic()]
        cmd = shlex.join(["vllm", "serve", *x.args(), "--port", str(x.port)])
        lines += [f"{cmd} &", f"wait_healthy {x.port}", ""]
    lines.append("wait")
    return "\n".join(lines) + "\n"


def emit_compose(plan: MemoryPlan, total_bytes: int, *, ports: Ports = None,
                 enforce_eager: bool = False) -> str:
    """A docker-compose file: one service per model, each waiting for the previous to be healthy."""
    instances = vllm_instances(plan, total_bytes, ports=ports, enforce_eager=enforce_eager)
    health = ('["CMD", "python3", "-c", "import urllib.request; '
              "urllib.request.urlopen('http://localhost:8000/health')\"]")
    lines = [f"# {h}" for h in _header(plan, instances, total_bytes)] + ["services:"]
    previous = None
    for x in instances:
        service = x.model.name.replace("/", "-").replace(":", "-").replace(".", "-").lower()
        lines += [f"  # {c}" for c in x.arithmetic()]
        lines += [f"  {service}:", f"    image: {VLLM_IMAGE}",
                  f"    command: [{', '.join(_quote(a) for a in x.args())}]",
                  f'    ports: ["{x.port}:8000"]', "    ipc: host",
                  "    volumes: [\"${HOME}/.cache/huggingface:/root/.cache/huggingface\"]",
                  "    deploy:", "      resources:", "        reservations:",
                  "          devices: [{driver: nvidia, count: all, capabilities: [gpu]}]",
                  "    healthcheck:", f"      test: {health}",
                  "      interval: 10s", "      timeout: 5s", "      retries: 60",
                  "      start_period: 60s"]
        if previous:
            lines += ["    depends_on:", f"      {previous}:", "        condition: service_healthy"]
        previous = service
    return "\n".join(lines) + "\n"


def _quote(arg: str) -> str:
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'
