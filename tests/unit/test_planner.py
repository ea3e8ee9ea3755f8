"""Memory planner: exact weights and KV bytes, budgets, policies and the not-fitting sentence."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import transformers
import yaml

from modelhive.cli.main import main
from modelhive.config import ModelSpec
from modelhive.errors import ConfigError
from modelhive.kernels.reference import cpu_packs
from modelhive.models.arch import ArchConfig
from modelhive.planner.estimates import (
    CUDA_OVERHEAD_BYTES,
    DECODE_STEPS,
    GRAPH_BYTES_PER_CAPTURE,
    SPLIT_K_WORKSPACE_BYTES,
    GiB,
    activation_bytes,
    graph_batch_sizes,
    graph_bytes,
)
from modelhive.planner.memory import plan_memory

from .hf_configs import QWEN2_5_3B, SMOLLM2_135M, TINYLLAMA_1_1B, YI_6B

HF = {"tinyllama": TINYLLAMA_1_1B, "qwen": QWEN2_5_3B, "yi": YI_6B, "smollm2": SMOLLM2_135M}
ARCHS = {name: ArchConfig.from_hf_config(cfg) for name, cfg in HF.items()}
THREE = [
    ModelSpec("tinyllama", "preset:tinyllama-1.1b", "float16", 1024, 32),
    ModelSpec("qwen", "preset:qwen2.5-3b", "float16", 1536, 24),
    ModelSpec("yi", "preset:yi-6b", "float16", 2048, 16),
]


def hf_param_count(cfg: dict) -> int:
    """transformers' own count of the same config, built on the meta device (nothing allocated)."""
    config = transformers.AutoConfig.for_model(**cfg)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "name, params, kv_per_token",
    [
        ("tinyllama", 1_100_048_384, 2 * 22 * 4 * 64 * 2),  # 22,528
        ("qwen", 3_085_938_688, 2 * 36 * 2 * 128 * 2),  # 36,864
        ("yi", 6_061_035_520, 2 * 32 * 4 * 128 * 2),  # 65,536
    ],
)
def test_exact_sizes_match_hand_values_and_transformers(name, params, kv_per_token):
    arch = ARCHS[name]
    assert kv_per_token in (22_528, 36_864, 65_536)
    assert arch.kv_bytes_per_token("float16") == kv_per_token
    assert arch.num_params() == params == hf_param_count(HF[name])
    plan = plan_memory(THREE, ARCHS, device="cuda", budget="32GiB", total_device_bytes=None)
    m = plan.model(name)
    assert (m.params, m.weight_bytes, m.kv_bytes_per_token) == (params, 2 * params, kv_per_token)


def test_smollm2_params_match_transformers():
    assert ARCHS["smollm2"].num_params() == hf_param_count(SMOLLM2_135M)


def test_cuda_graphs_are_planned_unless_eager_is_asked_for():
    """As `modelhive serve` runs: graphs by default on CUDA (vLLM's default), none on CPU."""
    default = plan_memory(THREE, ARCHS, device="cuda", budget="32GiB", total_device_bytes=None)
    graphs = plan_memory(THREE, ARCHS, device="cuda", budget="32GiB", total_device_bytes=None,
                         enforce_eager=False)
    eager = plan_memory(THREE, ARCHS, device="cuda", budget="32GiB", total_device_bytes=None,
                        enforce_eager=True)
    assert default.graph_bytes == graphs.graph_bytes > 0 and eager.graph_bytes == 0
    assert default.num_blocks == graphs.num_blocks < eager.num_blocks
    cpu = plan_memory(THREE, ARCHS, device="cpu", budget="32GiB", total_device_bytes=None)
    assert cpu.graph_bytes == 0


def test_three_model_plan_terms_add_up():
    plan = plan_memory(THREE, ARCHS, device="cuda", budget="32GiB", total_device_bytes=None,
                       enforce_eager=True)
    assert plan.fits and plan.problem is None
    assert plan.block_bytes == 65_536 * 16  # Yi gets exactly 16 tokens per block
    assert [m.tokens_per_block for m in plan.models] == [46, 28, 16]
    assert plan.weights_bytes == 2 * (1_100_048_384 + 3_085_938_688 + 6_061_035_520)
    assert plan.activation_bytes == max(m.activation_bytes for m in plan.models)
    assert plan.graph_bytes == 0 and plan.overhead_bytes == (CUDA_OVERHEAD_BYTES
                                                             + SPLIT_K_WORKSPACE_BYTES)
    rest = plan.budget_bytes - plan.weights_bytes - plan.activation_bytes - plan.overhead_bytes
    assert plan.num_blocks == rest // plan.block_bytes
    assert plan.kv_pool_bytes == plan.num_blocks * plan.block_bytes
    yi = plan.model("yi")
    assert yi.max_seqs_at_max_len == plan.num_blocks // (2048 // 16)
    assert plan.quotas()["yi"].max_blocks is None


def test_activation_formula_by_hand_tinyllama_cuda():
    t, s, h, q, kv, inter, v = 2048, 32, 2048, 2048, 256, 5632, 32000
    residual = 4 * t * h * 2
    mlp = residual + 3 * t * inter * 2  # the largest phase (H200 measured 90.1 MiB for 3 T h e)
    attention = residual + t * (q + 2 * kv) * 2 + t * (q + kv) * 2 + t * q * 2
    slack = 2 * 2**20
    plan = plan_memory(THREE, ARCHS, device="cuda", budget="32GiB", total_device_bytes=None)
    assert plan.model("tinyllama").activation_bytes == mlp + slack
    cpu = activation_bytes(ARCHS["tinyllama"], "float16", num_tokens=t, max_num_seqs=s,
                           max_model_len=1024, device="cpu")
    decode_scratch = 2 * s * 1024 * q * 2 + 2 * s * 32 * 1024 * 4
    # the sampler (logits, penalties' copy, draw copy; then the top-p sort of 64 rows at a
    # time; the penalties' 144 B per history entry, every row's 1,024 tokens) lies on top of
    # the largest phase on the CPU (an RSS peak), inside it on CUDA
    penalties = 144 * s * 1024
    sampler = 16 * s * v + 44 * 32 * v + penalties
    assert cpu == max(mlp, attention + decode_scratch, 2 * t * h * 2 + s * h * 2) + sampler + slack
    gpu = activation_bytes(ARCHS["tinyllama"], "float16", num_tokens=t, max_num_seqs=s,
                           max_model_len=1024, device="cuda")
    # on CUDA the draw kernel takes steps of 8 rows or more: the logits (2 B) and a float32
    # copy and count (8 B) an entry, or the torch path's peak at 7 rows
    kernel = max(16 * 7 * v + 44 * 7 * v, (2 + 8) * s * v) + penalties
    assert gpu == max(mlp, attention, 2 * t * h * 2 + s * h * 2 + kernel) + slack


def test_static_policy_splits_by_seqs_times_len_times_kv_bytes():
    plan = plan_memory(THREE, ARCHS, device="cuda", budget="32GiB", total_device_bytes=None,
                       policy="static")
    shares = [m.min_blocks for m in plan.models]
    assert sum(shares) == plan.num_blocks
    assert all(m.min_blocks == m.max_blocks for m in plan.models)
    weights = [32 * 1024 * 22_528, 24 * 1536 * 36_864, 16 * 2048 * 65_536]
    for share, w in zip(shares, weights, strict=True):
        assert abs(share - plan.num_blocks * w / sum(weights)) < 1
    tiny = plan.model("tinyllama")
    assert tiny.max_seqs_at_max_len == shares[0] // -(-1024 // 46)


def test_dtype_and_length_defaults():
    specs = [ModelSpec("qwen", "preset:qwen2.5-3b"), ModelSpec("tinyllama", "preset:x")]
    cpu = plan_memory(specs, ARCHS, device="cpu", budget="40GiB", total_device_bytes=None)
    assert [m.dtype for m in cpu.models] == ["float32", "float32"]
    assert [m.max_model_len for m in cpu.models] == [4096, 2048]
    assert [m.max_num_batched_tokens for m in cpu.models] == [512, 512]
    fp16 = {**ARCHS, "tinyllama": ARCHS["tinyllama"].replace(torch_dtype="float16")}
    gpu = plan_memory(specs, fp16, device="cuda", budget=0.9, total_device_bytes=80 * GiB)
    assert [m.dtype for m in gpu.models] == ["bfloat16", "float16"]
    assert [m.max_num_batched_tokens for m in gpu.models] == [2048, 2048]
    assert gpu.budget_bytes == int(0.9 * 80 * GiB)
    many = [ModelSpec("tinyllama", "preset:x", max_num_seqs=600)]
    assert plan_memory(many, ARCHS, device="cpu", budget="8GiB",
                       total_device_bytes=None).models[0].max_num_batched_tokens == 600


def test_max_model_len_above_architecture_is_config_error():
    specs = [ModelSpec("tinyllama", "preset:x", max_model_len=4096)]
    with pytest.raises(ConfigError) as err:
        plan_memory(specs, ARCHS, device="cpu", budget="8GiB", total_device_bytes=None)
    assert err.value.key == "max_model_len" and "2048" in str(err.value)


def test_cpu_default_budget_holds_every_sequence_and_caps_kv_at_4gib():
    small = [ModelSpec("smollm2", "preset:x", max_model_len=1024, max_num_seqs=4)]
    plan = plan_memory(small, ARCHS, device="cpu", budget=None, total_device_bytes=None)
    assert plan.fits and plan.model("smollm2").max_seqs_at_max_len == 4
    big = plan_memory(THREE, ARCHS, device="cpu", budget=None, total_device_bytes=None)
    assert big.kv_pool_bytes == (4 * GiB // big.block_bytes) * big.block_bytes


def test_not_fitting_names_the_term_and_the_amount():
    plan = plan_memory(THREE, ARCHS, device="cuda", budget="16GiB", total_device_bytes=None)
    assert not plan.fits and plan.num_blocks == 0
    over = (plan.weights_bytes + plan.activation_bytes + plan.graph_bytes + plan.overhead_bytes
            - 16 * GiB)
    assert "the weights" in plan.problem and f"{over / 1e9:.2f} GB" in plan.problem


def test_pool_too_small_for_one_sequence_names_the_model():
    specs = [ModelSpec("yi", "preset:yi-6b", "float16", max_model_len=4096, max_num_seqs=1)]
    fixed = plan_memory(specs, ARCHS, device="cuda", budget="64GiB", total_device_bytes=None)
    budget = 64 * GiB - fixed.kv_pool_bytes + 100 * fixed.block_bytes  # 100 blocks, 256 needed
    plan = plan_memory(specs, ARCHS, device="cuda", budget=budget, total_device_bytes=None)
    assert not plan.fits and plan.num_blocks == 100
    assert "model yi" in plan.problem and "max_model_len to 1600" in plan.problem


def test_guaranteed_minimums_beyond_pool():
    specs = [ModelSpec("tinyllama", "preset:x", "float16", 1024, 32, kv_min_tokens=10**9)]
    plan = plan_memory(specs, ARCHS, device="cuda", budget="32GiB", total_device_bytes=None)
    assert not plan.fits and "kv_min_tokens" in plan.problem


def test_budget_above_device_total_and_bad_inputs():
    plan = plan_memory(THREE, ARCHS, device="cuda", budget="32GiB",
                       total_device_bytes=32_607 * 2**20)
    assert not plan.fits and "total memory" in plan.problem
    for kwargs, key in [(dict(device="tpu"), "device"), (dict(policy="fair"), "policy"),
                        (dict(budget=0.5), "memory")]:
        args = {"device": "cuda", "budget": "32GiB", "total_device_bytes": None, **kwargs}
        with pytest.raises(ConfigError) as err:
            plan_memory(THREE, ARCHS, **args)
        assert err.value.key == key


# ------------------------------------------------------------------ `modelhive plan` end to end
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
THREE_YAML = str(EXAMPLES / "three-models-32gb.yaml")


def test_cli_not_fitting_exits_1_naming_the_term(capsys):
    assert main(["plan", THREE_YAML, "--memory", "16GiB"]) == 1
    out, err = capsys.readouterr()
    plan = plan_memory(THREE, ARCHS, device="cuda", budget="16GiB", total_device_bytes=None,
                       enforce_eager=False)
    over = plan.weights_bytes + plan.activation_bytes + plan.graph_bytes + plan.overhead_bytes
    assert len(err.strip().splitlines()) == 1 and "the weights (20.49 GB)" in err
    assert f"by {(over - 16 * GiB) / 1e9:.2f} GB" in err and "does NOT fit" in out


def test_cli_json_has_the_stable_keys(capsys):
    assert main(["plan", THREE_YAML, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert {"budget_bytes", "kv_pool_bytes", "fits", "models"} <= set(doc)
    assert doc["fits"] is True and doc["budget_bytes"] == 32 * GiB
    keys = {"name", "params", "weight_bytes", "kv_bytes_per_token", "tokens_per_block",
            "max_seqs_at_max_len"}
    assert [{k: m[k] for k in keys} for m in doc["models"]][2] == {
        "name": "yi-6b", "params": 6_061_035_520, "weight_bytes": 12_122_071_040,
        "kv_bytes_per_token": 65_536, "tokens_per_block": 16,
        "max_seqs_at_max_len": doc["num_blocks"] // 128}


def test_cli_unknown_source_is_one_line_naming_source(tmp_path, capsys):
    path = tmp_path / "hive.yaml"
    path.write_text("memory: 8GiB\nmodels:\n  - name: x\n    source: preset:no-such-model\n")
    assert main(["plan", str(path)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model x" in err and "no-such-model" in err


def test_emit_vllm_utilizations_by_hand(capsys):
    assert main(["plan", THREE_YAML, "--emit", "vllm"]) == 0
    script = capsys.readouterr().out
    utils = [float(u) for u in re.findall(r"--gpu-memory-utilization (\S+)", script)]
    assert utils == [0.1241, 0.2867, 0.5181]  # checked by hand against the rule below
    # vLLM v1: util x total = weights + activation + non-torch (128 MiB) + KV share, with the CUDA
    # context (512 MiB) and graphs outside; the KV left is split by seqs x len x KV bytes/token.
    total = 32_607 * 2**20
    usable = min(32 * GiB, int(0.98 * total))
    plan = plan_memory(THREE, ARCHS, device="cuda", budget="32GiB", total_device_bytes=None,
                       enforce_eager=False)
    fixed = [m.weight_bytes + m.activation_bytes + 128 * 2**20 for m in plan.models]
    outside = [512 * 2**20 + graph_bytes(m.arch, m.dtype, max_num_seqs=m.max_num_seqs,
                                          max_model_len=m.max_model_len, device="cuda",
                                          enforce_eager=False, decode_steps=1)
               for m in plan.models]
    kv_total = usable - sum(fixed) - sum(outside)
    weights = [32 * 1024 * 22_528, 24 * 1536 * 36_864, 16 * 2048 * 65_536]
    for util, f, w in zip(utils, fixed, weights, strict=True):
        share = kv_total * w // sum(weights)
        assert util == math.floor((f + share) * 10_000 / total) / 10_000
    assert sum(u * total for u in utils) + sum(outside) <= usable
    assert script.index("wait_healthy 8001") < script.index("vllm serve Qwen/Qwen2.5-3B-Instruct")


def test_emit_compose_orders_services_by_health(capsys):
    assert main(["plan", THREE_YAML, "--emit", "compose"]) == 0
    services = yaml.safe_load(capsys.readouterr().out)["services"]
    assert list(services) == ["tinyllama-1-1b", "qwen2-5-3b", "yi-6b"]
    assert "depends_on" not in services["tinyllama-1-1b"]
    assert services["yi-6b"]["depends_on"] == {"qwen2-5-3b": {"condition": "service_healthy"}}
    cmd = services["yi-6b"]["command"]
    assert cmd[cmd.index("--gpu-memory-utilization") + 1] == "0.5181"


def test_default_example_fits_on_this_machine(capsys):
    assert main(["plan", str(EXAMPLES / "default.yaml"), "--device", "cpu"]) == 0
    assert "fits" in capsys.readouterr().out


@pytest.mark.parametrize("device,dtype,extra", [("cpu", "bfloat16", True), ("cpu", "float32", False),
                                                ("cuda", "bfloat16", False)])
def test_cpu_packed_tied_head_is_planned(device, dtype, extra):
    """CPU bf16/fp16 with tied embeddings keeps a packed copy of the table for the LM head, where
    this CPU's oneDNN packs that dtype."""
    arch = ArchConfig.from_hf_config(SMOLLM2_135M)
    assert arch.tie_word_embeddings
    spec = ModelSpec(name="smol", source="preset:smollm2-135m", dtype=dtype, max_model_len=512,
                     max_num_seqs=4)
    plan = plan_memory([spec], {"smol": arch}, device=device, budget=8 * GiB,
                       total_device_bytes=80 * GiB)
    elem = 2 if dtype == "bfloat16" else 4
    table = arch.vocab_size * arch.hidden_size * elem
    extra = extra and cpu_packs(torch.bfloat16)  # a CPU without AVX-512 packs nothing
    assert plan.model("smol").weight_bytes == arch.weight_bytes(dtype) + (table if extra else 0)


def test_prefill_graph_sizes_cover_the_token_budget():
    from modelhive.planner.estimates import graph_max_rows, prefill_graph_sizes

    for seqs, budget in [(256, 8192), (12, 96), (8, 2048), (32, 1000)]:
        sizes = prefill_graph_sizes(seqs, budget)
        assert sizes[0] == 2 * graph_max_rows(seqs) and sizes[-1] >= budget
        assert all(b <= 2 * a for a, b in zip(sizes[:-1], sizes[1:], strict=True))
    assert prefill_graph_sizes(256, 256) == []  # the decode graphs hold every step


def test_graph_bytes_count_the_prefill_graphs():
    arch = ARCHS["qwen"]
    decode = graph_bytes(arch, "bfloat16", max_num_seqs=32, max_model_len=2048, device="cuda",
                         enforce_eager=False)
    both = graph_bytes(arch, "bfloat16", max_num_seqs=32, max_model_len=2048, device="cuda",
                       enforce_eager=False, max_num_batched_tokens=4096)
    transient = activation_bytes(arch, "bfloat16", num_tokens=4096, max_num_seqs=32,
                                 max_model_len=2048, device="cuda")
    assert both > decode + transient // 2
    assert graph_bytes(arch, "bfloat16", max_num_seqs=32, max_model_len=2048, device="cuda",
                       enforce_eager=True, max_num_batched_tokens=4096) == 0


def test_graph_bytes_count_the_multi_step_decode_graphs():
    arch = ARCHS["qwen"]
    kw = dict(max_num_seqs=32, max_model_len=2048, device="cuda", enforce_eager=False)
    single = graph_bytes(arch, "bfloat16", decode_steps=1, **kw)
    buckets = len(graph_batch_sizes(32))
    # each bucket's 4-step graph: one more capture, and its tokens [4, 32] outside the pool
    assert graph_bytes(arch, "bfloat16", decode_steps=4, **kw) == \
        single + buckets * GRAPH_BYTES_PER_CAPTURE + 8 * 4 * 32
    assert graph_bytes(arch, "bfloat16", **kw) == graph_bytes(arch, "bfloat16",
                                                              decode_steps=DECODE_STEPS, **kw)


def test_sampler_and_penalty_terms():
    """The sampler's plan: the torch path below 8 rows or without the kernel; with it, the
    logits and 8 B an entry; the penalties' per-entry tensors bounded by one group of rows."""
    from modelhive.planner.estimates import penalty_bytes, sampler_bytes

    v = 151936
    assert sampler_bytes(5, v, kernel=True) == sampler_bytes(5, v) == (16 + 44) * 5 * v
    assert sampler_bytes(256, v) == (16 * 256 + 44 * 64) * v
    assert sampler_bytes(256, v, kernel=True, logits_bytes=2) == 10 * 256 * v
    assert sampler_bytes(24, v, kernel=True, logits_bytes=2) == sampler_bytes(7, v)
    assert penalty_bytes(256, 32768) == 144 * 2**18  # one group
    assert penalty_bytes(1, 131072) == 144 * 131072  # one longer history
    assert penalty_bytes(4, 256) == 144 * 1024  # every row's whole history
    # the Triton kernel holds only the int64 ids, in groups of up to 2^22 entries
    assert penalty_bytes(256, 4096, kernel=True) == 8 * 256 * 4096
    assert penalty_bytes(256, 32768, kernel=True) == 8 * 2**22
