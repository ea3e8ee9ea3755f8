"""Prefill attention tiles (``paged_attention``'s ``prefill_config``) against the FLOPs of the
causal attention, on the GPU machine: per shape, every config runs as a CUDA graph of 4 calls on
a paged pool (16-token blocks scattered at random), eager metadata, bf16.

    PYTHONPATH=src python3 bench/gpu_prefill_sweep.py [--shapes=SUBSTRING]

Prints per shape the default config's time and TFLOP/s, then the best six configs. Shapes: the
throughput workload's prompt steps (Qwen2.5-0.5B: 16 prompts of 512 tokens), one long prompt,
and a 128-dim model's prompts.
"""

from __future__ import annotations

import functools
import itertools
import sys

import torch
from sweep_configs import rank_configs

from modelhive.bench.offline import replay_ms
from modelhive.kernels.triton.paged_attention import paged_attention
from modelhive.runner.attn_metadata import SeqChunk, build_attention_metadata

T = 16
CALLS = 4
# (name, heads, kv heads, head dim, [(cached, new)] per sequence)
SHAPES = [
    ("qwen2.5-0.5b 16x512", 14, 2, 64, [(0, 512)] * 16),
    ("qwen2.5-0.5b 1x8000", 14, 2, 64, [(0, 8000)]),
    ("yi-6b 4x512", 32, 4, 128, [(0, 512)] * 4),
]


def setup(heads, kv_heads, dim, seqs, gen):
    blocks = sum(-(-(c + n) // T) for c, n in seqs)
    k = torch.randn(blocks + 1, T, kv_heads, dim, dtype=torch.bfloat16, device="cuda")
    v = torch.randn_like(k)
    order = torch.randperm(blocks, generator=gen).tolist()
    chunks, at = [], 0
    for c, n in seqs:
        need = -(-(c + n) // T)
        chunks.append(SeqChunk(c, n, tuple(b + 1 for b in order[at:at + need])))
        at += need
    meta = build_attention_metadata(chunks, T, "cuda")
    q = torch.randn(meta.num_tokens, heads, dim, dtype=torch.bfloat16, device="cuda")
    flops = sum(4 * heads * dim * (c * n + n * (n + 1) / 2) for c, n in seqs)
    return q, k, v, meta, flops


def time_config(q, k, v, meta, cfg) -> tuple[float, torch.Tensor]:
    scale = q.shape[-1] ** -0.5
    paged_attention(q, k, v, meta, scale, prefill_config=cfg)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [paged_attention(q, k, v, meta, scale, prefill_config=cfg) for _ in range(CALLS)]
    us = 1e3 * replay_ms(graph, repeats=10) / CALLS
    del graph
    return us, outs[0].clone()


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    only = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--shapes=")), "")
    grid = list(itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3)))
    for name, heads, kvh, dim, seqs in SHAPES:
        if only not in name:
            continue
        q, k, v, meta, flops = setup(heads, kvh, dim, seqs, gen)
        base_t, base_out = time_config(q, k, v, meta, None)
        configs = [{"block_m": bm, "block_n": bn, "num_warps": warps, "num_stages": stages}
                   for bm, bn, warps, stages in grid
                   if dim * bn * stages <= 128 * 128 * 2]  # shared memory
        results = rank_configs(functools.partial(time_config, q, k, v, meta), configs, base_out)
        print(f"{name}: default {base_t:.1f} us ({flops / base_t / 1e6:,.0f} TFLOP/s)")
        for t, cfg, err in results[:6]:
            print(f"   {t:8.1f} us {flops / t / 1e6:6,.0f} TFLOP/s  {cfg}  max diff {err:.2g}")
        del q, k, v
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
