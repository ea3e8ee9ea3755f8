"""Linears for decode batches of a few rows: one weight-streaming kernel per linear, with the
neighbouring ops fused in.

Contracts (``reference.norm_linear`` / ``linear_add`` / ``act_linear_add``; x ``[M, K']``,
weight ``[N, K]``, at most ``GEMV_MAX_ROWS`` rows):

    out = [residual +] prologue(x) @ weight.T [+ bias]

``prologue``: nothing, RMSNorm (each program sums the squares of its row of x first: x is a few
KiB, read from L2), or act-and-mul of a fused gate_up output ``[M, 2K]``
(``activation.gated_act``). The prologue's output is rounded to the model dtype before the
product, as the unfused ops round their outputs; products accumulate in float32; bias and
residual are added in float32 and the sum rounded once, as cuBLAS's epilogue does.

Why not cuBLAS here: at one row a linear is a pure weight stream, and cuBLAS's GEMV reaches only
~1.5-1.8 TB/s on the 8-10 MB q/k/v/o matrices of a 1B model (H200, ~4.2 TB/s copy), plus a
split-K reduce kernel, a separate RMSNorm and act-and-mul kernel per linear. Here every linear is
ONE kernel, and with PDL (``pdl.py``) each program loads its first weight tile before waiting for
the previous kernel, so the weight stream runs on across kernel boundaries.

Layout of the work: program ``j * M + r`` computes output columns ``j*BLOCK_N ..`` of row ``r``
(a 1-D grid: a 150k-word LM head has more column blocks than a grid's second axis allows); rows
are the fastest index so the programs of all rows that share a weight tile run side by side and
all but one read it from L2. A program either loads its weight rows whole (``FULL_K``: rows of
at most ``FULL_K_MAX``, the tall gate_up and LM-head matrices) before the PDL wait, or streams
them in ``BLOCK_K`` chunks, the next chunk's load issued before the current one is used (a
two-deep register pipeline), into ``[BLOCK_N, BLOCK_K]`` partial products reduced once at the
end. ``pick_config`` chooses per shape and prologue.

(An earlier Triton GEMM for up to 64 rows with ``tl.dot`` tiles, removed at commit aa141c3, was
1.1-5x slower than cuBLAS: its 16-row dot tiles and serial long rows starved the memory system.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from modelhive.kernels.triton import pdl
from modelhive.kernels.triton.activation import gated_act

#: the most rows a step may have for the GEMV path; larger steps use cuBLAS (``linears.py``)
GEMV_MAX_ROWS = 4
#: the longest row (K, padded to a power of two) a program loads whole
FULL_K_MAX = 4096

_NONE, _RMSNORM, _SILU, _GELU_TANH = 0, 1, 2, 3
_PROLOGUES = {None: _NONE, "rmsnorm": _RMSNORM, "silu": _SILU, "gelu_tanh": _GELU_TANH}


@triton.jit
def _prologue(x_row, norm_w_ptr, kk, k_mask, rstd, K, offset, dtype: tl.constexpr,
              PROLOGUE: tl.constexpr):
    """Columns ``kk`` of the row's linear input, rounded to ``dtype``, as float32."""
    if PROLOGUE == 0:
        a = tl.load(x_row + kk, mask=k_mask, other=0.0).to(tl.float32)
    elif PROLOGUE == 1:
        xt = tl.load(x_row + kk, mask=k_mask, other=0.0).to(tl.float32)
        nw = tl.load(norm_w_ptr + kk, mask=k_mask, other=0.0).to(tl.float32)
        a = ((xt * rstd) * (offset + nw)).to(dtype).to(tl.float32)
    else:
        gate = tl.load(x_row + kk, mask=k_mask, other=0.0)
        up = tl.load(x_row + K + kk, mask=k_mask, other=0.0)
        a = gated_act(gate, up, dtype, PROLOGUE == 3).to(tl.float32)
    return a


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, bias_ptr, norm_w_ptr, res_ptr, out_ptr,
    M, N, K, stride_xm, stride_wn, stride_rm, stride_om, eps, offset,
    PROLOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FULL_K: tl.constexpr, USE_PDL: tl.constexpr,
):
    pid = tl.program_id(0)
    row = pid % M  # the fastest: the rows sharing a weight tile run side by side
    pid_n = pid // M
    dtype = x_ptr.dtype.element_ty
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    rk = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * stride_wn
    x_row = x_ptr + row.to(tl.int64) * stride_xm
    # Weights are never written during a step, so they may load before the wait: all of this
    # program's rows (FULL_K: BLOCK_K >= K), or the first chunk of them.
    w_next = tl.load(w_rows + rk[None, :], mask=n_mask[:, None] & (rk < K)[None, :], other=0.0)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    rstd = 1.0
    if FULL_K:
        k_mask = rk < K
        if PROLOGUE == 1:
            xt = tl.load(x_row + rk, mask=k_mask, other=0.0).to(tl.float32)
            rstd = 1.0 / tl.sqrt_rn(tl.sum(xt * xt, 0) / K + eps)
        a = _prologue(x_row, norm_w_ptr, rk, k_mask, rstd, K, offset, dtype, PROLOGUE)
        out = tl.sum(w_next.to(tl.float32) * a[None, :], 1)
    else:
        if PROLOGUE == 1:  # RMSNorm: the row's sum of squares first
            sq = tl.zeros([BLOCK_K], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                xt = tl.load(x_row + k0 + rk, mask=(k0 + rk) < K, other=0.0).to(tl.float32)
                sq += xt * xt
            rstd = 1.0 / tl.sqrt_rn(tl.sum(sq, 0) / K + eps)
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            w = w_next
            kn = k0 + BLOCK_K + rk
            w_next = tl.load(w_rows + kn[None, :], mask=n_mask[:, None] & (kn < K)[None, :],
                             other=0.0)
            kk = k0 + rk
            a = _prologue(x_row, norm_w_ptr, kk, kk < K, rstd, K, offset, dtype, PROLOGUE)
            acc += w.to(tl.float32) * a[None, :]
        out = tl.sum(acc, 1)
    if HAS_BIAS:
        out += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
    if HAS_RES:
        out += tl.load(res_ptr + row.to(tl.int64) * stride_rm + rn, mask=n_mask,
                       other=0.0).to(tl.float32)
    # rounded to the model dtype like the unfused linear's output, then stored as ``out``'s
    # dtype (float32 logits)
    tl.store(out_ptr + row.to(tl.int64) * stride_om + rn,
             out.to(dtype).to(out_ptr.dtype.element_ty), mask=n_mask)


def pick_config(n: int, k: int, prologue: str | None = None) -> dict:
    """Tile sizes for an ``[N, K]`` weight stream with the given prologue, from
    ``bench/gpu_gemv_tune.py --sweep`` on H200 (one row; chains of calls on distinct weights
    inside a CUDA graph, PDL on; each decode linear of the presets with its own prologue and
    residual). With a prologue, each program re-reads its input row from L2, so programs take
    more weight rows (4-8) than a plain stream needs. Measured, us (cuBLAS composite in brackets):
    TinyLlama qkv 3.9 (8.4), o 3.6 (6.0), gate_up 14.2 (16.2), down 8.5 (12.8), LM head 32 (35);
    Yi-6B qkv 12.4 (16.3), o 10.1 (13.4), gate_up 48.3 (49.2), down 25.3 (29.7), LM head 118 (131).
    """
    k_pad = triton.next_power_of_2(k)
    block_k = min(1024, max(16, k_pad))

    def full(block_n: int, warps: int) -> dict:
        return {"BLOCK_N": block_n, "BLOCK_K": max(16, k_pad), "FULL_K": True,
                "num_warps": warps, "num_stages": 1}

    def chunked(block_n: int, chunk: int, warps: int) -> dict:
        return {"BLOCK_N": block_n, "BLOCK_K": min(chunk, block_k), "FULL_K": False,
                "num_warps": warps, "num_stages": 1}

    if prologue == "rmsnorm":  # q/k/v and gate_up
        if k_pad <= 2048:
            return full(8 if n <= 4096 else 4, 4)
        return chunked(8 if n <= 8192 else 4, 512, 4)
    if prologue is None and n >= 8192 and k_pad <= FULL_K_MAX:  # LM heads
        return full(2, 8)
    if n <= 2048:  # o and down of a 2048-wide model: few programs, more warps each
        return chunked(8 if prologue is None else 4, 1024, 8)
    return chunked(8, 1024, 4)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
         prologue: str | None = None, norm_weight: torch.Tensor | None = None,
         eps: float = 0.0, offset: float = 0.0, residual: torch.Tensor | None = None,
         out: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """``[residual +] prologue(x) @ weight.T [+ bias]`` in one kernel; ``prologue``: None,
    "rmsnorm" (with ``norm_weight``, ``eps``, ``offset``), "silu" or "gelu_tanh" (x ``[M, 2K]``).
    ``out`` may be ``residual`` itself (each program reads its residual columns before it writes
    them). ``config`` overrides ``pick_config`` (benchmarks; its ``pdl`` key forces PDL on or
    off)."""
    n, k = weight.shape
    m = x.shape[0]
    if m > GEMV_MAX_ROWS:
        raise ValueError(f"gemv takes at most {GEMV_MAX_ROWS} rows, got {m}")
    code = _PROLOGUES.get(prologue)
    if code is None:
        raise ValueError(f"unknown prologue {prologue!r}")
    if x.shape[1] != (2 * k if code in (_SILU, _GELU_TANH) else k):
        raise ValueError(f"x of shape {tuple(x.shape)} does not fit a weight of shape "
                         f"{tuple(weight.shape)} with prologue {prologue!r}")
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
    if m == 0:
        return out
    cfg = dict(config or pick_config(n, k, prologue))
    use_pdl = cfg.pop("pdl", None)
    use_pdl = pdl.enabled(x) if use_pdl is None else use_pdl
    grid = (m * triton.cdiv(n, cfg["BLOCK_N"]),)
    _gemv_kernel[grid](
        x, weight, bias if bias is not None else weight,
        norm_weight if norm_weight is not None else weight,
        residual if residual is not None else out, out,
        m, n, k, x.stride(0), weight.stride(0),
        residual.stride(0) if residual is not None else 0, out.stride(0),
        float(eps), float(offset),
        PROLOGUE=code, HAS_BIAS=bias is not None, HAS_RES=residual is not None,
        USE_PDL=use_pdl, launch_pdl=use_pdl, **cfg,
    )
    return out
