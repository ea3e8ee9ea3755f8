"""Linears for small batches (decode) with their neighbours fused in: one kernel per linear.

Contracts (``reference.norm_linear`` / ``linear_add`` / ``act_linear_add``; x ``[M, K]``, weight
``[N, K]``): at most ``SMALL_M`` rows, one kernel computes

    out = [residual +] prologue(x) @ weight.T [+ bias]

with ``prologue`` one of: nothing, RMSNorm (each program first sums the squares of its rows of x,
which are tiny next to the weight it streams), or act-and-mul of a fused gate_up output ``[M, 2K]``
(``activation.gated_act``). The prologue's output is rounded to the model dtype before the product,
as the unfused ops round their outputs; accumulation is float32; bias and residual are added in
float32 and the sum rounded once, as cuBLAS's epilogue (``addmm`` with beta = 1) does.

Why: at decode batch sizes every linear is a weight stream (M x K is small), so the norm, the
activation and the residual add cost a kernel launch each and nothing else; fusing them leaves six
kernels per Llama layer instead of eleven. Each program owns ``BLOCK_N`` output columns (weight
rows) for ``BLOCK_M`` rows of x and streams its weight rows once; ``tl.dot`` with ``BLOCK_M`` >= 16
lets Triton pipeline the weight loads. Above ``SMALL_M`` rows (prefill) the ops fall back to the
unfused kernels plus cuBLAS (``addmm`` for the adds).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from modelhive.kernels.triton.activation import gated_act, gelu_tanh_and_mul, silu_and_mul
from modelhive.kernels.triton.rmsnorm import rms_norm

#: the largest M the fused kernel takes; larger inputs use cuBLAS (compute-bound there)
SMALL_M = 64

_NONE, _RMSNORM, _SILU, _GELU_TANH = 0, 1, 2, 3
_ACT = {"silu": _SILU, "gelu_tanh": _GELU_TANH}
_UNFUSED_ACT = {"silu": silu_and_mul, "gelu_tanh": gelu_tanh_and_mul}


@triton.jit
def _fused_linear_kernel(
    x_ptr, w_ptr, bias_ptr, norm_w_ptr, res_ptr, out_ptr,
    M, N, K, stride_xm, stride_wn, stride_rm, stride_om, eps, offset,
    PROLOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    dtype = out_ptr.dtype.element_ty
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_mask = rm < M
    n_mask = rn < N
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * stride_wn
    if PROLOGUE == 1:  # RMSNorm: the rows' sums of squares first
        sq = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            xt = tl.load(x_rows + kk[None, :], mask=m_mask[:, None] & (kk < K)[None, :],
                         other=0.0).to(tl.float32)
            sq += tl.sum(xt * xt, 1)
        rstd = 1.0 / tl.sqrt_rn(sq / K + eps)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_mask = kk < K
        x_mask = m_mask[:, None] & k_mask[None, :]
        if PROLOGUE == 0:
            a = tl.load(x_rows + kk[None, :], mask=x_mask, other=0.0)
        elif PROLOGUE == 1:
            xt = tl.load(x_rows + kk[None, :], mask=x_mask, other=0.0).to(tl.float32)
            nw = tl.load(norm_w_ptr + kk, mask=k_mask, other=0.0).to(tl.float32)
            a = ((xt * rstd[:, None]) * (offset + nw[None, :])).to(dtype)
        else:
            gate = tl.load(x_rows + kk[None, :], mask=x_mask, other=0.0)
            up = tl.load(x_rows + K + kk[None, :], mask=x_mask, other=0.0)
            a = gated_act(gate, up, dtype, PROLOGUE == 3)
        w = tl.load(w_rows + kk[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        acc = tl.dot(a, tl.trans(w), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    if HAS_RES:
        res = tl.load(res_ptr + rm.to(tl.int64)[:, None] * stride_rm + rn[None, :], mask=out_mask,
                      other=0.0)
        acc += res.to(tl.float32)
    tl.store(out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :], acc.to(dtype),
             mask=out_mask)


def pick_config(m: int, n: int, k: int) -> dict:
    """Tile sizes and launch settings for an ``[m, k] x [k, n]`` weight stream: enough programs
    along N to cover the SMs about twice, weight tiles of 16-32 KiB per pipeline stage."""
    block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
    block_n = 64
    while block_n > 16 and triton.cdiv(n, block_n) < 256:
        block_n //= 2
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": 256 if block_m <= 32 else 128,
            "num_warps": 4, "num_stages": 4}


def fused_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                 prologue: str | None = None, norm_weight: torch.Tensor | None = None,
                 eps: float = 0.0, offset: float = 0.0, residual: torch.Tensor | None = None,
                 config: dict | None = None) -> torch.Tensor:
    """``[residual +] prologue(x) @ weight.T [+ bias]`` in one kernel; ``prologue``: None,
    "rmsnorm" (with ``norm_weight``, ``eps``, ``offset``), "silu" or "gelu_tanh" (x ``[M, 2K]``).
    ``config`` overrides ``pick_config`` (benchmarks)."""
    n, k = weight.shape
    m = x.shape[0]
    code = _RMSNORM if prologue == "rmsnorm" else _ACT.get(prologue, _NONE)
    if prologue is not None and code == _NONE:
        raise ValueError(f"unknown prologue {prologue!r}")
    if x.shape[1] != (2 * k if code in (_SILU, _GELU_TANH) else k):
        raise ValueError(f"x of shape {tuple(x.shape)} does not fit a weight of shape "
                         f"{tuple(weight.shape)} with prologue {prologue!r}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    if residual is not None and residual.stride(-1) != 1:
        residual = residual.contiguous()
    cfg = dict(config or pick_config(m, n, k))
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(m, cfg["BLOCK_M"]))
    _fused_linear_kernel[grid](
        x, weight, bias if bias is not None else weight,
        norm_weight if norm_weight is not None else weight,
        residual if residual is not None else out, out,
        m, n, k, x.stride(0), weight.stride(0),
        residual.stride(0) if residual is not None else 0, out.stride(0),
        float(eps), float(offset),
        PROLOGUE=code, HAS_BIAS=bias is not None, HAS_RES=residual is not None,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32", **cfg,
    )
    return out


def norm_linear(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, offset: float,
                weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if x.shape[0] <= SMALL_M:
        return fused_linear(x, weight, bias, prologue="rmsnorm", norm_weight=norm_weight,
                            eps=eps, offset=offset)
    return F.linear(rms_norm(x, norm_weight, eps, offset), weight, bias)


def linear_add(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    if x.shape[0] <= SMALL_M:
        return fused_linear(x, weight, residual=residual)
    return torch.addmm(residual, x, weight.t())


def act_linear_add(x: torch.Tensor, act: str, weight: torch.Tensor,
                   residual: torch.Tensor) -> torch.Tensor:
    if x.shape[0] <= SMALL_M:
        return fused_linear(x, weight, prologue=act, residual=residual)
    return torch.addmm(residual, _UNFUSED_ACT[act](x), weight.t())
