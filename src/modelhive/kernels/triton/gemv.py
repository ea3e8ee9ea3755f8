"""Linears for decode batches of a few rows: one weight-streaming kernel per linear, with the
neighbouring ops fused in.

Contracts (``reference.norm_linear`` / ``linear_add`` / ``norm_linear_act``; x ``[M, K]``,
weight ``[N, K]``; correct for any rows, used up to ``GEMV_MAX_ROWS``):

    out = [residual +] prologue(x) @ weight.T [+ bias]
    gated: out = act(prologue(x) @ gate.T) * (prologue(x) @ up.T)   (weight = [gate; up])

``prologue``: nothing or RMSNorm (each program sums the squares of its row of x first: x is a few
KiB, read from L2), rounded to the model dtype before the product as the unfused norm rounds its
output; products accumulate in float32; bias and residual are added in float32 and the sum
rounded once, as cuBLAS's epilogue does. Gated (the MLP's gate_up): a program reads BLOCK_N gate
rows and the BLOCK_N up rows N below them, rounds both products to the model dtype (the unfused
linear's output) and applies ``activation.gated_act``, so the down projection after it is a plain
stream. (The activation used to sit in the down projection's prologue, where every program
recomputed it over the whole [M, 2I] input: the step's linears took 642-667 us against 616-643
for TinyLlama, H200, same runs.)

Why not cuBLAS here: at one row a linear is a pure weight stream, and cuBLAS's GEMV reaches only
~1.5-1.8 TB/s on the 8-10 MB q/k/v/o matrices of a 1B model (H200, ~4.2 TB/s copy), plus a
split-K reduce kernel, a separate RMSNorm and act-and-mul kernel per linear. Here every linear is
ONE kernel, and with PDL (``pdl.py``) each program loads its first weight tile before waiting for
the previous kernel, so the weight stream runs on across kernel boundaries. Weight loads are
marked evict-first: read once per step, they should not push the activations, the KV of the
step and the next kernel's inputs out of L2 (TinyLlama batch 1: graph replay 749 -> 734 us,
1,334 -> 1,363 tok/s; Qwen2.5-3B 535 -> 537; H200, alternated in one call).

Layout of the work: program ``j * M + r`` computes output columns ``j*BLOCK_N ..`` of row ``r``
(a 1-D grid: a 150k-word LM head has more column blocks than a grid's second axis allows); rows
are the fastest index so the programs of all rows that share a weight tile run side by side and
all but one read it from L2. A program either loads its weight rows whole (``FULL_K``: rows of
at most ``FULL_K_MAX``, the tall gate_up and LM-head matrices) before the PDL wait, or streams
them in ``BLOCK_K`` chunks, the next chunk's load issued before the current one is used (a
two-deep register pipeline), into ``[BLOCK_N, BLOCK_K]`` partial products reduced once at the
end. Whole-row configs may be persistent (``PERSIST`` programs per SM, fewer than the tiles):
each program computes its prologue row once and loops over tiles, the next tile's rows loading
while the current one reduces; the gate_up and LM-head streams gain 5-20 % from it (the
RMSNorm'd row is built once per program instead of once per tile). ``pick_config`` chooses per
shape and prologue.

(An earlier Triton GEMM for up to 64 rows with ``tl.dot`` tiles, removed at commit aa141c3, was
1.1-5x slower than cuBLAS: its 16-row dot tiles and serial long rows starved the memory system.)
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from modelhive.kernels.triton import pdl
from modelhive.kernels.triton.activation import gated_act

#: the most rows a step may have for the GEMV path (``linears.py``); larger steps use cuBLAS.
#: Each row has its own programs, which read the weight tile they share from L2: a TinyLlama
#: layer stack's linears take 602 / 924 / 1,557 / 2,869 us at 1 / 2 / 4 / 8 rows against
#: cuBLAS's flat ~930 us (Qwen2.5-3B: 1,521 / 2,245 / 3,803 vs ~2,100; H200, docs/benchmarks.md),
#: so the GEMV stops at 2 rows.
GEMV_MAX_ROWS = 2
#: the longest row (K, padded to a power of two) a program loads whole
FULL_K_MAX = 4096

_PROLOGUES = {None: 0, "rmsnorm": 1}
#: ``act`` of a gated GEMV (the epilogue's activation; 0: none)
_GATED = {None: 0, "silu": 1, "gelu_tanh": 2}


@triton.jit
def _weights(ptrs, mask):
    """A weight tile: read once per step, so evicted from L2 first (module docstring)."""
    return tl.load(ptrs, mask=mask, other=0.0, eviction_policy="evict_first")


@triton.jit
def _prologue(x_row, norm_w_ptr, kk, k_mask, rstd, offset, dtype: tl.constexpr,
              PROLOGUE: tl.constexpr):
    """Columns ``kk`` of the row's linear input (RMSNorm'd with ``rstd`` for ``PROLOGUE`` 1),
    rounded to ``dtype``, as float32."""
    if PROLOGUE == 0:
        a = tl.load(x_row + kk, mask=k_mask, other=0.0).to(tl.float32)
    else:
        xt = tl.load(x_row + kk, mask=k_mask, other=0.0).to(tl.float32)
        nw = tl.load(norm_w_ptr + kk, mask=k_mask, other=0.0).to(tl.float32)
        a = ((xt * rstd) * (offset + nw)).to(dtype).to(tl.float32)
    return a


@triton.jit
def _epilogue(out, up, rn, n_mask, row, N, bias_ptr, res_ptr, out_ptr, stride_rm, stride_om,
              dtype: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
              GATED: tl.constexpr):
    """Bias, the gated activation (``up``: the up half's products) or the residual, then the
    store of one tile of output columns ``rn`` of ``row``."""
    if HAS_BIAS:
        out += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
        if GATED > 0:
            up += tl.load(bias_ptr + N + rn, mask=n_mask, other=0.0).to(tl.float32)
    if GATED > 0:
        # gate and up rounded like the unfused linear's output, then act-and-mul as
        # ``activation.gated_act`` rounds it
        out = gated_act(out.to(dtype), up.to(dtype), dtype, GATED == 2).to(tl.float32)
    if HAS_RES:
        out += tl.load(res_ptr + row.to(tl.int64) * stride_rm + rn, mask=n_mask,
                       other=0.0).to(tl.float32)
    # rounded to the model dtype like the unfused linear's output, then stored as ``out``'s
    # dtype (float32 logits)
    tl.store(out_ptr + row.to(tl.int64) * stride_om + rn,
             out.to(dtype).to(out_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, bias_ptr, norm_w_ptr, res_ptr, out_ptr,
    M, N, K, stride_xm, stride_wn, stride_rm, stride_om, eps, offset,
    PROLOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
    GATED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FULL_K: tl.constexpr,
    LOOP: tl.constexpr, USE_PDL: tl.constexpr, PDL_EARLY: tl.constexpr,
):
    pid = tl.program_id(0)
    row = pid % M  # the fastest: the rows sharing a weight tile run side by side
    pid_n = pid // M
    dtype = x_ptr.dtype.element_ty
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    rk = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * stride_wn
    up_rows = w_rows + N * stride_wn  # GATED: the up half's rows, N below the gate rows
    x_row = x_ptr + row.to(tl.int64) * stride_xm
    # Weights are never written during a step, so they may load before the wait: all of this
    # program's rows (FULL_K: BLOCK_K >= K), or the first chunk of them.
    first_mask = n_mask[:, None] & (rk < K)[None, :]
    w_next = _weights(w_rows + rk[None, :], first_mask)
    if GATED > 0:
        u_next = _weights(up_rows + rk[None, :], first_mask)
    pdl.wait(USE_PDL, PDL_EARLY)
    rstd = 1.0
    if FULL_K:
        k_mask = rk < K
        if PROLOGUE == 1:  # one load of the row for both its sum of squares and the product
            xt = tl.load(x_row + rk, mask=k_mask, other=0.0).to(tl.float32)
            rstd = 1.0 / tl.sqrt_rn(tl.sum(xt * xt, 0) / K + eps)
            nw = tl.load(norm_w_ptr + rk, mask=k_mask, other=0.0).to(tl.float32)
            a = ((xt * rstd) * (offset + nw)).to(dtype).to(tl.float32)
        else:
            a = _prologue(x_row, norm_w_ptr, rk, k_mask, rstd, offset, dtype, PROLOGUE)
        if LOOP:
            # a grid smaller than the tiles (``PERSIST``): the prologue's row is computed once
            # for several tiles; the next tile's rows load while this one's products reduce
            step = tl.num_programs(0) // M
            for tile in range(pid_n, tl.cdiv(N, BLOCK_N), step):
                w = w_next
                rn = tile * BLOCK_N + tl.arange(0, BLOCK_N)
                n_mask = rn < N
                rn_next = rn + step * BLOCK_N
                next_rows = w_ptr + rn_next.to(tl.int64)[:, None] * stride_wn + rk[None, :]
                next_mask = (rn_next < N)[:, None] & k_mask[None, :]
                w_next = _weights(next_rows, next_mask)
                out = tl.sum(w.to(tl.float32) * a[None, :], 1)
                if GATED > 0:
                    u = u_next
                    u_next = _weights(next_rows + N * stride_wn, next_mask)
                    up = tl.sum(u.to(tl.float32) * a[None, :], 1)
                else:
                    up = out  # unused
                _epilogue(out, up, rn, n_mask, row, N, bias_ptr, res_ptr, out_ptr, stride_rm,
                          stride_om, dtype, HAS_BIAS, HAS_RES, GATED)
        else:  # one tile, loaded before the wait (no second buffer: half the registers)
            out = tl.sum(w_next.to(tl.float32) * a[None, :], 1)
            if GATED > 0:
                up = tl.sum(u_next.to(tl.float32) * a[None, :], 1)
            else:
                up = out  # unused
            _epilogue(out, up, rn, n_mask, row, N, bias_ptr, res_ptr, out_ptr, stride_rm,
                      stride_om, dtype, HAS_BIAS, HAS_RES, GATED)
    else:
        if PROLOGUE == 1:  # RMSNorm: the row's sum of squares first
            sq = tl.zeros([BLOCK_K], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                xt = tl.load(x_row + k0 + rk, mask=(k0 + rk) < K, other=0.0).to(tl.float32)
                sq += xt * xt
            rstd = 1.0 / tl.sqrt_rn(tl.sum(sq, 0) / K + eps)
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            w = w_next
            kn = k0 + BLOCK_K + rk
            next_mask = n_mask[:, None] & (kn < K)[None, :]
            w_next = _weights(w_rows + kn[None, :], next_mask)
            kk = k0 + rk
            a = _prologue(x_row, norm_w_ptr, kk, kk < K, rstd, offset, dtype, PROLOGUE)
            acc += w.to(tl.float32) * a[None, :]
            if GATED > 0:
                u = u_next
                u_next = _weights(up_rows + kn[None, :], next_mask)
                acc_up += u.to(tl.float32) * a[None, :]
        out = tl.sum(acc, 1)
        if GATED > 0:
            up = tl.sum(acc_up, 1)
        else:
            up = out  # unused
        _epilogue(out, up, rn, n_mask, row, N, bias_ptr, res_ptr, out_ptr, stride_rm,
                  stride_om, dtype, HAS_BIAS, HAS_RES, GATED)


@functools.cache
def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # Triton's CPU interpreter
    return torch.cuda.get_device_properties(device).multi_processor_count


def pick_config(n: int, k: int, prologue: str | None = None, gated: bool = False) -> dict:
    """Tile sizes for an ``[N, K]`` weight stream with the given prologue, from
    ``bench/gpu_gemv_tune.py --sweep`` on H200 (one row; chains of calls on distinct weights
    inside a CUDA graph, PDL on; each decode linear of the presets with its own prologue and
    residual). With a prologue, each program re-reads its input row from L2, so programs take
    more weight rows (4-8) than a plain stream needs, or loop over several tiles (``PERSIST``).
    ``gated``: ``n`` counts the gate and up rows together, and a program reads ``BLOCK_N`` rows
    of each (half the plain tile). Measured, us (cuBLAS composite in brackets; gate_up with the
    gated activation, down a plain stream with the residual):
    TinyLlama qkv 3.9 (8.4; with the 8-row programs it had before session 18), o 3.6 (6.0;
    chunked, before o took whole rows), gate_up 13.1 (17.4), down 7.4 (11.1), LM head 31.5 (35);
    Qwen2.5-3B gate_up 23.7 (29.2), down 12.9 (16.5), LM head 142 (150);
    Yi-6B qkv 11.7 (16.3), o 10.1 (13.4), gate_up 44.0 (50.9), down 24.0 (28.6), LM head 118.6 (131).
    """
    cfg = _pick(n, k, prologue)
    if gated:
        cfg["BLOCK_N"] = max(1, cfg["BLOCK_N"] // 2)
    return cfg


def _pick(n: int, k: int, prologue: str | None) -> dict:
    k_pad = triton.next_power_of_2(k)
    block_k = min(1024, max(16, k_pad))

    def full(block_n: int, warps: int, persist: int = 0) -> dict:
        return {"BLOCK_N": block_n, "BLOCK_K": max(16, k_pad), "FULL_K": True,
                "num_warps": warps, "num_stages": 1, "PERSIST": persist}

    def chunked(block_n: int, chunk: int, warps: int) -> dict:
        return {"BLOCK_N": block_n, "BLOCK_K": min(chunk, block_k), "FULL_K": False,
                "num_warps": warps, "num_stages": 1}

    if prologue == "rmsnorm":  # q/k/v and gate_up
        if k_pad <= 2048:
            # gate_up: 4 persistent programs per SM, all resident at once (105 registers a
            # thread: 4 fit an SM); 8 ran as two waves (TinyLlama step 733.6 -> 718.8 us,
            # Qwen2.5-3B 1,838.8 -> 1,816.0, with evict-first weight loads; H200, one call).
            # q/k/v: 4 weight rows a program, not 8 (graph replay, alternated: TinyLlama
            # 0.722-0.730 -> 0.717-0.722 ms, Qwen2.5-3B 1.838-1.847 -> 1.827-1.830; H200, s18)
            return full(4, 4) if n <= 4096 else full(4, 4, persist=4)
        if k_pad <= FULL_K_MAX:
            return full(2, 8, persist=4)
        return chunked(8 if n <= 8192 else 4, 512, 4)
    if prologue is None and n >= 8192 and k_pad <= FULL_K_MAX:  # LM heads
        return full(4, 8, persist=4) if k_pad <= 2048 else full(2, 8, persist=4)
    if prologue is None and k_pad <= 2048:
        # o of a 2048-wide model (and narrower): whole rows, loaded before the PDL wait, i.e.
        # while the attention kernels before it run (TinyLlama step 756 -> 748 us, Qwen2.5-3B
        # 1,892 -> 1,856; Yi-6B's 4096-wide rows got slower that way: 3,043 -> 3,088)
        return full(4, 4)
    if n <= 2048:  # down of a 2048-wide model: few programs, more warps each
        return chunked(8 if prologue is None else 4, 1024, 8)
    return chunked(8, 1024, 4)


def linear_operands(name: str, x: torch.Tensor, weight: torch.Tensor,
                    residual: torch.Tensor | None, act: str | None, out: torch.Tensor | None):
    """The checks and layouts ``gemv`` and ``skinny_gemm.skinny_linear`` share: rows with unit
    stride, a ``[2N, K]`` gate_up weight without residual when ``act`` is set, ``out`` allocated or
    checked. Returns ``(x, weight, residual, out, n, gated)`` (``gated``: the ``act`` code)."""
    m, k = x.shape[0], weight.shape[1]
    rows = weight.shape[0]
    gated = _GATED.get(act)
    if gated is None:
        raise ValueError(f"unknown gated activation {act!r}")
    if gated and (rows % 2 or residual is not None):
        raise ValueError(f"a gated {name} takes a [2N, K] gate_up weight and no residual")
    if x.shape[1] != k:
        raise ValueError(f"{name}: x of shape {tuple(x.shape)} does not fit a weight of shape "
                         f"{tuple(weight.shape)}")
    n = rows // 2 if gated else rows
    if x.stride(-1) != 1:
        x = x.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    if residual is not None and residual.stride(-1) != 1:
        residual = residual.contiguous()
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    elif out.shape != (m, n) or out.stride(-1) != 1:
        raise ValueError(f"out must be a [{m}, {n}] tensor with contiguous rows")
    return x, weight, residual, out, n, gated


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
         prologue: str | None = None, norm_weight: torch.Tensor | None = None,
         eps: float = 0.0, offset: float = 0.0, residual: torch.Tensor | None = None,
         act: str | None = None, out: torch.Tensor | None = None,
         config: dict | None = None) -> torch.Tensor:
    """``[residual +] prologue(x) @ weight.T [+ bias]`` in one kernel; ``prologue``: None or
    "rmsnorm" (with ``norm_weight``, ``eps``, ``offset``).
    ``act`` ("silu" or "gelu_tanh"): ``weight`` is a fused gate_up ``[2N, K]`` (bias ``[2N]``)
    and the result is ``act(gate) * up`` ``[M, N]`` (no residual).
    ``out`` may be ``residual`` itself (each program reads its residual columns before it writes
    them). ``config`` overrides ``pick_config`` (benchmarks; its ``pdl`` key forces PDL on or
    off)."""
    rows, k = weight.shape
    m = x.shape[0]
    code = _PROLOGUES.get(prologue)
    if code is None:
        raise ValueError(f"unknown prologue {prologue!r}")
    x, weight, residual, out, n, gated = linear_operands("gemv", x, weight, residual, act, out)
    if m == 0:
        return out
    cfg = dict(config or pick_config(rows, k, prologue, gated=bool(gated)))
    use_pdl = cfg.pop("pdl", None)
    use_pdl = pdl.enabled(x) if use_pdl is None else use_pdl
    programs = triton.cdiv(n, cfg["BLOCK_N"])
    per_sm = cfg.pop("PERSIST", 0)  # persistent programs loop over whole rows only
    per_sm = per_sm if cfg["FULL_K"] else 0
    if per_sm:
        programs = min(programs, per_sm * sm_count(x.device))
    grid = (m * programs,)
    _gemv_kernel[grid](
        x, weight, bias if bias is not None else weight,
        norm_weight if norm_weight is not None else weight,
        residual if residual is not None else out, out,
        m, n, k, x.stride(0), weight.stride(0),
        residual.stride(0) if residual is not None else 0, out.stride(0),
        float(eps), float(offset),
        PROLOGUE=code, HAS_BIAS=bias is not None, HAS_RES=residual is not None, GATED=gated,
        LOOP=bool(per_sm), USE_PDL=use_pdl, PDL_EARLY=pdl.EARLY, launch_pdl=use_pdl, **cfg,
    )
    return out
