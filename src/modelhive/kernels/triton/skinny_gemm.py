"""Linears for a few rows (3 to ``linears.SKINNY_ROWS``) on the tensor cores: "swap-AB" weight streams.

Contracts (``reference.linear_add`` / ``norm_linear_act`` after the RMSNorm; x ``[M, K]``,
weight ``[N, K]``, bf16 or fp16):

    out = [residual +] x @ weight.T [+ bias]
    gated: out = act(x @ gate.T) * (x @ up.T)   (weight = [gate; up], the MLP's gate_up)

At 3-64 rows a decode linear is still a weight stream (each weight is used by a few rows only),
and the MMA's wide side must be the weights, not the rows: each program computes the transposed
tile ``out.T[BLOCK_N, BLOCK_M] = W[BLOCK_N, K] @ x.T[K, BLOCK_M]``, so BLOCK_N (64 or 128) weight
rows are the MMA's M side (Hopper's warpgroup MMA takes M = 64 per warpgroup) and the few x rows,
padded to 16-64, its N side (more rows: one program per weight tile and 64-row tile, correct for
any row count; ``linears.py`` uses it up to 32). The K loop is software-pipelined through shared memory
(``tl.range(num_stages=...)``), which keeps ``STAGES`` weight tiles in flight per program.
A stream with few weight tiles for the chip (q/k/v and o of 0.5-3B models: 14-40 tiles of 64
rows on 132 SMs) splits K over 3-4 programs per tile (``split_k``): each stores its float32
partial tile in a per-device workspace and counts itself in; the tile's last split sums the
partials in split order (so the bits do not depend on which split finishes last), resets the
counter and runs the epilogue (H200, batch 32: TinyLlama +3.0 %, Qwen2.5-3B +4.4 % end to end).
Launched with PDL (``pdl.py``), the programs are resident before the kernel ahead of them ends;
they wait before their first load (a first weight tile loaded ahead of the wait would need its
own shared-memory buffers beside the pipeline's).

Rounding as the unfused ops round: products accumulate in float32; bias and residual are added in
float32 and the sum rounded once (cuBLAS's epilogue); gated: gate and up rounded to the model
dtype (the unfused linear's output), then ``activation.gated_act``.

Measured (H200, bf16; docs/benchmarks.md, session 15): alone (8 weight copies a CUDA graph),
gate_up with its activation at 8 / 32 rows, TinyLlama 14.3 / 15.3 us against cuBLAS +
act-and-mul 20.1 / 20.4, Yi-6B 45.1 / 46.4 against 55.1 / 55.1 (~4 TB/s, the copy rate); q/k/v
and o at parity with cuBLAS alone, and the down projection slower (too few weight tiles for its
long rows). In a layer stack (PDL between the kernels), q/k/v, o and gate_up here and down in
cuBLAS: Qwen2.5-0.5B 723 -> 625 us at 32 rows, TinyLlama 980 -> 911, Qwen2.5-3B 2,188 -> 2,148,
Yi-6B 3,390 -> 3,261. Past 32 rows it stops paying: at 64 rows 0.5B 749 -> 660 and TinyLlama
1,046 -> 984 but Qwen2.5-3B 2,297 -> 2,350 and Yi-6B 3,527 -> 4,118; at 128 and 232 rows cuBLAS
wins on every stack (0.5B 944-978 vs 1,073 at 232), and the throughput workload read the same
with the stream up to 256 rows (74,641 vs 74,172 tok/s, one run each).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from modelhive.kernels.triton import pdl
from modelhive.kernels.triton.activation import gated_act
from modelhive.kernels.triton.gemv import linear_operands, sm_count
from modelhive.planner.estimates import SPLIT_K_PARTIAL_BYTES, SPLIT_K_WORKSPACE_TILES

#: rows a program takes (the MMA's N side, padded to a power of two >= 16); more rows take more
#: programs per weight tile. Where the kernel is used instead of cuBLAS: ``linears.SKINNY_ROWS``
MAX_BLOCK_M = 64

#: shared memory the pipeline's stages may take (H100/H200: 227 KiB a block, less some room for
#: the epilogue's layout conversion)
SMEM_BUDGET = 220 * 1024
DTYPES = (torch.bfloat16, torch.float16)
#: split-K: a stream with few weight tiles for the SMs (q/k/v and o of 0.5-3B models: 14-40
#: tiles of 64 rows on 132 SMs) splits its K range over up to MAX_SPLIT_K programs per tile, each at
#: least two key tiles long; the partial tiles meet in a per-device float32 workspace of
#: WORKSPACE_BYTES (the split is skipped where it would not fit) and WORKSPACE_TILES counters,
#: planned with the device overhead (``planner.estimates.SPLIT_K_WORKSPACE_BYTES``).
#: ``MODELHIVE_SPLIT_K=0`` turns it off (A/B measurements).
MAX_SPLIT_K = 4
#: ... and only where it at least triples the programs: Yi-6B's o projection (64 tiles) split
#: in two ran 0.5 % slower end to end (H200, session 16)
MIN_SPLIT_K = 3
WORKSPACE_TILES = SPLIT_K_WORKSPACE_TILES
WORKSPACE_BYTES = SPLIT_K_PARTIAL_BYTES
USE_SPLIT_K = os.environ.get("MODELHIVE_SPLIT_K", "1") != "0"
_workspaces: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


@triton.jit
def _epilogue(acc, acc_up, rn, rm, n_mask, m_mask, N, bias_ptr, res_ptr, out_ptr, stride_rm,
              stride_om, dtype: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
              GATED: tl.constexpr):
    """Bias, the gated activation or the residual, then the store of ``out.T``'s tile."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[:, None]
        if GATED > 0:
            acc_up += tl.load(bias_ptr + N + rn, mask=n_mask, other=0.0).to(tl.float32)[:, None]
    if GATED > 0:
        acc = gated_act(acc.to(dtype), acc_up.to(dtype), dtype, GATED == 2).to(tl.float32)
    out_mask = n_mask[:, None] & m_mask[None, :]
    if HAS_RES:
        acc += tl.load(res_ptr + rm.to(tl.int64)[None, :] * stride_rm + rn[:, None],
                       mask=out_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rm.to(tl.int64)[None, :] * stride_om + rn[:, None],
             acc.to(dtype).to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _skinny_kernel(
    x_ptr, w_ptr, bias_ptr, res_ptr, out_ptr, ws_ptr, count_ptr,
    M, N, K, stride_xm, stride_wn, stride_rm, stride_om, k_split,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, GATED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
    SPLIT_K: tl.constexpr, USE_PDL: tl.constexpr, PDL_EARLY: tl.constexpr,
):
    # one program per (weight tile, tile of BLOCK_M rows, split of K), the splits of a tile and
    # the row tiles of a weight tile side by side (the latter read it from L2 but for one)
    num_m = tl.cdiv(M, BLOCK_M)
    split = tl.program_id(0) % SPLIT_K
    tile = tl.program_id(0) // SPLIT_K
    pid_n = tile // num_m
    pid_m = tile % num_m
    dtype = x_ptr.dtype.element_ty
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    n_mask = rn < N
    m_mask = rm < M
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * stride_wn
    up_rows = w_rows + N * stride_wn  # GATED: the up half's rows, N below the gate rows
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
    pdl.wait(USE_PDL, PDL_EARLY)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    acc_up = acc
    k_lo = split * k_split
    for k0 in tl.range(k_lo, tl.minimum(K, k_lo + k_split), BLOCK_K, num_stages=STAGES):
        kk = k0 + rk
        k_mask = kk < K
        w = tl.load(w_rows + kk[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0,
                    eviction_policy="evict_first")
        x = tl.load(x_rows + kk[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        acc = tl.dot(w, tl.trans(x), acc)
        if GATED > 0:
            u = tl.load(up_rows + kk[None, :], mask=n_mask[:, None] & k_mask[None, :],
                        other=0.0, eviction_policy="evict_first")
            acc_up = tl.dot(u, tl.trans(x), acc_up)

    if SPLIT_K == 1:
        _epilogue(acc, acc_up, rn, rm, n_mask, m_mask, N, bias_ptr, res_ptr, out_ptr,
                  stride_rm, stride_om, dtype, HAS_BIAS, HAS_RES, GATED)
    else:
        # split-K (never gated): each split stores its float32 partial tile; the last split of
        # the tile to arrive (a counter per tile, released after every thread's stores and
        # reset to 0 by that last split) sums the partials in split order, so the result does
        # not depend on the arrival order, and runs the epilogue
        tile_elems: tl.constexpr = BLOCK_N * BLOCK_M
        offs = tl.arange(0, BLOCK_N)[:, None] * BLOCK_M + tl.arange(0, BLOCK_M)[None, :]
        slots = ws_ptr + tile.to(tl.int64) * (SPLIT_K * tile_elems)
        tl.store(slots + split * tile_elems + offs, acc)
        tl.debug_barrier()
        arrived = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            total = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
            for s in tl.static_range(SPLIT_K):
                total += tl.load(slots + s * tile_elems + offs, cache_modifier=".cg")
            tl.atomic_xchg(count_ptr + tile, 0)
            _epilogue(total, total, rn, rm, n_mask, m_mask, N, bias_ptr, res_ptr, out_ptr,
                      stride_rm, stride_om, dtype, HAS_BIAS, HAS_RES, GATED)


def _block_m(m: int) -> int:
    return min(MAX_BLOCK_M, max(16, triton.next_power_of_2(m)))


def pick_config(m: int, n: int, k: int, gated: bool) -> dict:
    """Tiles from the session-15 sweep (H200; docs/benchmarks.md): 64 weight rows x 128 keys,
    5 stages; tall gated streams (gate + up >= 16k rows, K >= 4096) 128 x 128, 3 stages. Fewer
    stages where a stage's weight and x tiles would not fit ``SMEM_BUDGET`` bytes."""
    if gated and n >= 16384 and k >= 4096:
        cfg = {"BLOCK_N": 128, "BLOCK_K": 128, "STAGES": 3, "num_warps": 4}
    else:
        cfg = {"BLOCK_N": 64, "BLOCK_K": 128, "STAGES": 5, "num_warps": 4}
    block_m = _block_m(m)
    stage = (cfg["BLOCK_N"] * (2 if gated else 1) + block_m) * cfg["BLOCK_K"] * 2
    cfg["STAGES"] = max(2, min(cfg["STAGES"], SMEM_BUDGET // stage))
    return cfg


def _workspace(device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The device's split-K workspace and tile counters (zero between kernels: the last split of
    a tile resets its counter), allocated on first use outside a graph capture (kernels run one
    after another on one stream, so one workspace serves every call); None while capturing
    before any eager call has allocated it."""
    ws = _workspaces.get(device)
    if ws is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        ws = (torch.empty(WORKSPACE_BYTES // 4, dtype=torch.float32, device=device),
              torch.zeros(WORKSPACE_TILES, dtype=torch.int32, device=device))
        _workspaces[device] = ws
    return ws


def _split_fits(tiles: int, split: int, cfg: dict, block_m: int) -> bool:
    """The partial tiles and counters of ``split`` splits per tile fit the workspace."""
    return (tiles <= WORKSPACE_TILES
            and tiles * split * cfg["BLOCK_N"] * block_m * 4 <= WORKSPACE_BYTES)


def split_k(tiles: int, k: int, cfg: dict, block_m: int, gated: bool, sms: int) -> int:
    """K splits per tile for a stream of ``tiles`` tiles over K keys (1: no split)."""
    if gated or not USE_SPLIT_K:
        return 1
    split = min(MAX_SPLIT_K, sms // tiles, k // (2 * cfg["BLOCK_K"]))
    if split < MIN_SPLIT_K or not _split_fits(tiles, split, cfg, block_m):
        return 1
    return split


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                  residual: torch.Tensor | None = None, act: str | None = None,
                  out: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """``[residual +] x @ weight.T [+ bias]``, or with ``act`` ("silu" / "gelu_tanh") a fused
    gate_up ``[2N, K]`` weight's ``act(gate) * up`` ``[M, N]``; ``out`` may be ``residual``
    itself (each program reads its residual tile before it writes it). ``config`` overrides
    ``pick_config`` (benchmarks)."""
    m, k = x.shape
    rows = weight.shape[0]
    x, weight, residual, out, n, gated = linear_operands("skinny_linear", x, weight, residual,
                                                         act, out)
    if m == 0:
        return out
    cfg = dict(config or pick_config(m, rows, k, bool(gated)))
    use_pdl = pdl.enabled(x)
    block_m = _block_m(m)
    tiles = triton.cdiv(n, cfg["BLOCK_N"]) * triton.cdiv(m, block_m)
    split = cfg.pop("SPLIT_K", None)
    if split is None:
        split = split_k(tiles, k, cfg, block_m, bool(gated), sm_count(x.device))
    elif split > 1 and (gated or not _split_fits(tiles, split, cfg, block_m)):
        raise ValueError(f"SPLIT_K={split} does not apply here (a gated stream, or "
                         f"{tiles} tiles too many for the workspace)")
    ws = _workspace(x.device) if split > 1 else None
    if ws is None:
        split = 1
        ws = (out, out)  # unused
    k_split = triton.cdiv(triton.cdiv(k, split), cfg["BLOCK_K"]) * cfg["BLOCK_K"]
    split = triton.cdiv(k, k_split)  # no split without keys
    _skinny_kernel[(tiles * split,)](
        x, weight, bias if bias is not None else weight,
        residual if residual is not None else out, out, ws[0], ws[1],
        m, n, k, x.stride(0), weight.stride(0),
        residual.stride(0) if residual is not None else 0, out.stride(0), k_split,
        HAS_BIAS=bias is not None, HAS_RES=residual is not None, GATED=gated,
        BLOCK_M=block_m, SPLIT_K=split, USE_PDL=use_pdl, PDL_EARLY=pdl.EARLY,
        launch_pdl=use_pdl, **cfg,
    )
    return out
