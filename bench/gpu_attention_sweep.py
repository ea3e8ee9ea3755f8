"""Decode attention tiles (``paged_attention``'s ``decode_config``) against the KV bytes read, on
the GPU machine: per shape, every config runs as a CUDA graph of 8 calls over 8 distinct
"layers" of a paged pool (16-token blocks, tables scattered at random, lengths spread +-40 %
around the context), with the split merge when it splits, PDL on as in the decode graphs.

    PYTHONPATH=src python3 bench/gpu_attention_sweep.py [--quick] [--shapes=SUBSTRING] [--T=16]
        [--contiguous]

(``--T``: tokens per block; ``--contiguous``: each sequence's blocks in order instead of
scattered, to see what the access pattern costs.) Ends with the registers, shared memory and
programs per SM of each decode kernel variant it compiled.

Prints per shape: us per call, the KV read rate (GB/s) and the config, after the default
config. Shapes: the throughput workload's decode phases (qwen2.5-0.5b: 14 heads / 2 kv heads /
64 dims, 32-256 rows, 700-1,400 keys, tables 2,064 keys wide) and the batch-32 latency shapes.
"""

from __future__ import annotations

import functools
import importlib
import itertools
import sys

import torch
from sweep_configs import rank_configs

from modelhive.bench.offline import replay_ms
from modelhive.kernels.triton.paged_attention import paged_attention
from modelhive.runner.attn_metadata import AttentionMetadata

# the module (the package re-exports the function under the module's name)
pa = importlib.import_module("modelhive.kernels.triton.paged_attention")

T = int(next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--T=")), 16))
CONTIGUOUS = "--contiguous" in sys.argv
LAYERS = 8
# (name, rows, context, heads, kv heads, head dim, table width in keys)
SHAPES = [
    ("0.5b rows>=192", 232, 717, 14, 2, 64, 2064),
    ("0.5b rows 128-191", 160, 900, 14, 2, 64, 2064),
    ("0.5b rows 64-127", 100, 1200, 14, 2, 64, 2064),
    ("0.5b rows <64", 32, 1400, 14, 2, 64, 2064),
    ("tinyllama b=32", 32, 200, 32, 4, 64, 320),
    ("qwen3b b=32", 32, 200, 16, 2, 128, 320),
    ("yi6b b=32", 32, 200, 32, 4, 128, 320),
]


def setup(rows, context, heads, kv_heads, dim, width, gen):
    lens = [max(1, int(context * (0.6 + 0.8 * gen.random()))) for _ in range(rows)]
    lens = [min(n, width) for n in lens]
    blocks_per_seq = -(-width // T)
    num_blocks = rows * blocks_per_seq + 1
    caches = [(torch.randn(num_blocks, T, kv_heads, dim, dtype=torch.bfloat16, device="cuda"),
               torch.randn(num_blocks, T, kv_heads, dim, dtype=torch.bfloat16, device="cuda"))
              for _ in range(LAYERS)]
    if CONTIGUOUS:  # each sequence's blocks in order, one after another
        perm = torch.arange(1, num_blocks, dtype=torch.int32, device="cuda")
    else:
        perm = torch.randperm(num_blocks - 1, device="cuda").to(torch.int32) + 1
    tables = perm[:rows * blocks_per_seq].view(rows, blocks_per_seq).contiguous()
    seq_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    pos = (seq_lens - 1).long()
    meta = AttentionMetadata(
        tokens_per_block=T, num_decodes=rows, positions=pos,
        slot_blocks=tables.gather(1, (pos // T).view(-1, 1).int().long()).view(-1).long(),
        slot_offsets=pos % T,
        query_start_loc=torch.arange(rows + 1, dtype=torch.int32, device="cuda"),
        seq_lens=seq_lens, block_tables=tables,
        query_start_loc_host=tuple(range(rows + 1)), seq_lens_host=(width,) * rows)
    q = torch.randn(rows, heads, dim, dtype=torch.bfloat16, device="cuda")
    kv_bytes = sum(lens) * kv_heads * dim * 2 * 2
    return q, caches, meta, kv_bytes


def time_config(q, caches, meta, cfg) -> tuple[float, torch.Tensor]:
    scale = q.shape[-1] ** -0.5
    for k, v in caches[:1]:  # compile outside the capture
        paged_attention(q, k, v, meta, scale, decode_config=cfg)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [paged_attention(q, k, v, meta, scale, decode_config=cfg) for k, v in caches]
    us = 1e3 * replay_ms(graph, repeats=10) / LAYERS
    del graph
    return us, outs[0].clone()


def main() -> None:
    quick = "--quick" in sys.argv
    gen = __import__("random").Random(0)
    # partitions (1 << 16: no split, one program covers a sequence's keys), key tiles, warps,
    # pipeline depths
    grid = list(itertools.product((256, 512, 1024, 1 << 16), (32, 64, 128), (2, 4, 8), (2, 3)))
    if quick:
        grid = list(itertools.product((256, 512, 1 << 16), (64,), (4,), (2, 3)))
    only = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--shapes=")), "")
    for name, rows, context, heads, kvh, dim, width in SHAPES:
        if only not in name:
            continue
        q, caches, meta, kv_bytes = setup(rows, context, heads, kvh, dim, width, gen)
        base_t, base_out = time_config(q, caches, meta, None)
        configs = [{"partition": part, "block_n": bn, "num_warps": warps, "num_stages": stages}
                   for part, bn, warps, stages in grid
                   if not (dim == 128 and bn == 128 and stages == 3)]  # shared memory
        results = rank_configs(functools.partial(time_config, q, caches, meta), configs, base_out)
        print(f"{name}: {rows} rows, ~{context} keys, {heads}/{kvh} heads x {dim}: default "
              f"{base_t:.1f} us ({kv_bytes / base_t / 1e3:,.0f} GB/s)")
        for t, cfg, err in results[:6]:
            print(f"   {t:7.1f} us {kv_bytes / t / 1e3:7,.0f} GB/s  {cfg}  max diff {err:.2g}")
        del q, caches
        torch.cuda.empty_cache()
    occupancy()


def occupancy() -> None:
    """Registers, spills and shared memory of every decode kernel variant compiled here, and
    how many of its programs fit one SM."""
    props = torch.cuda.get_device_properties(0)
    print("decode kernel variants compiled (registers / spills / shared bytes -> programs per SM):")
    for kernel_cache in (c[0] for c in pa._decode_kernel.device_caches.values()):
        for kern in kernel_cache.values():
            warps, smem = kern.metadata.num_warps, kern.metadata.shared
            fit = min(32, 65536 // max(1, kern.n_regs * 32 * warps), 64 // warps,
                      props.shared_memory_per_multiprocessor // smem if smem else 32)
            print(f"   warps {warps} stages {kern.metadata.num_stages}: {kern.n_regs} / "
                  f"{kern.n_spills} / {smem} -> {fit}")


if __name__ == "__main__":
    main()
