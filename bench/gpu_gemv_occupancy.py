"""Registers, spills and resident programs per SM of the GEMV config each decode linear gets.

    PYTHONPATH=src python3 bench/gpu_gemv_occupancy.py

For the linears of TinyLlama-1.1B, Qwen2.5-3B and Yi-6B at one row, compiles the GEMV with
``gemv.pick_config``'s tiles and prints the compiled kernel's registers per thread, spills,
shared memory, and how many of its programs fit one SM (the least of: 32 blocks, 64 warps,
65,536 registers, the SM's shared memory). A persistent config with more programs than fit
runs in waves; a kernel whose programs cannot sit beside the previous kernel's cannot load
its weights early under PDL (docs/benchmarks.md, session 7).
"""

from __future__ import annotations

import torch
import triton

from modelhive.kernels.triton import gemv as G

DT = torch.bfloat16
SM_REGS = 65536
# (name, N, K, prologue, "res" (residual add) | "silu" (gated) | None)
LINEARS = [
    ("tinyllama qkv", 2560, 2048, "rmsnorm", None), ("tinyllama o", 2048, 2048, None, "res"),
    ("tinyllama gate_up", 11264, 2048, "rmsnorm", "silu"),
    ("tinyllama down", 2048, 5632, None, "res"), ("tinyllama lm_head", 32000, 2048, None, None),
    ("qwen3b gate_up", 22016, 2048, "rmsnorm", "silu"), ("qwen3b down", 2048, 11008, None, "res"),
    ("yi qkv", 5120, 4096, "rmsnorm", None), ("yi o", 4096, 4096, None, "res"),
    ("yi gate_up", 22016, 4096, "rmsnorm", "silu"), ("yi down", 4096, 11008, None, "res"),
]


def main() -> None:
    props = torch.cuda.get_device_properties(0)
    print(torch.cuda.get_device_name(), f"{props.multi_processor_count} SMs")
    for name, n, k, pro, extra in LINEARS:
        w = torch.randn(n, k, device="cuda", dtype=DT)
        x = torch.randn(1, k, device="cuda", dtype=DT)
        nw = torch.ones(k, device="cuda", dtype=DT)
        act = extra if extra == "silu" else None
        n_out = n // 2 if act else n
        res = torch.randn(1, n_out, device="cuda", dtype=DT) if extra == "res" else None
        out = res if res is not None else torch.empty(1, n_out, device="cuda", dtype=DT)
        c = dict(G.pick_config(n, k, pro, gated=act is not None))
        per = c.pop("PERSIST", 0)
        per = per if c["FULL_K"] else 0
        programs = triton.cdiv(n_out, c["BLOCK_N"])
        if per:
            programs = min(programs, per * props.multi_processor_count)
        kern = G._gemv_kernel[(programs,)](
            x, w, w, nw, out, out, 1, n_out, k, x.stride(0), w.stride(0), out.stride(0),
            out.stride(0), 1e-6, 0.0, PROLOGUE=1 if pro else 0, HAS_BIAS=False,
            HAS_RES=res is not None, GATED=1 if act else 0, LOOP=bool(per), USE_PDL=False,
            PDL_EARLY=True, **c)
        regs, spills, warps = kern.n_regs, kern.n_spills, c["num_warps"]
        smem = kern.metadata.shared
        by_regs = SM_REGS // max(1, regs * 32 * warps)
        by_smem = props.shared_memory_per_multiprocessor // smem if smem else 32
        fit = min(32, by_regs, 64 // warps, by_smem)
        print(f"{name:18s} BLOCK_N={c['BLOCK_N']} BLOCK_K={c['BLOCK_K']} whole rows={c['FULL_K']} "
              f"warps={warps} persist={per} programs={programs}: {regs} registers, {spills} "
              f"spills, {smem} B shared -> {fit} per SM ({fit * props.multi_processor_count} "
              f"on the chip)")


if __name__ == "__main__":
    main()
