"""The fused linears of ``reference.py`` on CUDA.

Decode-sized inputs (at most ``gemv.GEMV_MAX_ROWS`` rows: batch-1 decode, short prompts) take the
Triton GEMV of ``gemv.py``: one kernel per linear with the RMSNorm in its prologue and bias +
residual or the gated activation (gate_up) in its epilogue, launched with PDL so the weight
stream runs on across kernel boundaries. From 3 to ``SKINNY_ROWS`` rows (bf16/fp16), q/k/v, o and
gate_up take the swap-AB tensor-core stream of ``skinny_gemm.py`` (after the RMSNorm kernel; the
gated activation, bias and residual in its epilogue), the down projection cuBLAS. Larger inputs
are compute-shaped and take cuBLAS:

- ``norm_linear``: the Triton RMSNorm kernel, then ``F.linear``.
- ``linear_add``: ``residual.addmm_(x, weight.T)``: the residual add runs in cuBLAS's epilogue
  (beta = 1) and the result overwrites ``residual`` (the residual stream's old value is dead by
  then); an out-of-place ``addmm`` would first copy ``residual`` with one more kernel.
- ``norm_linear_act``: the Triton RMSNorm kernel, ``F.linear``, the Triton act-and-mul kernel.

Measured (H200, bf16, inside CUDA graphs, ``bench/gpu_gemv_tune.py``): the linears of a whole
TinyLlama decode step at one row take 616-643 us with the GEMV + PDL against 918-936 us with these
cuBLAS composites (yi-6b 2,937 vs 3,363-3,466 us). At 32 rows and up cuBLAS stays: it was 1.1-5x faster than
an earlier Triton GEMM with ``tl.dot`` tiles (removed at commit aa141c3).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from modelhive.kernels.triton.activation import gelu_tanh_and_mul, silu_and_mul
from modelhive.kernels.triton.gemv import GEMV_MAX_ROWS, gemv
from modelhive.kernels.triton.rmsnorm import rms_norm
from modelhive.kernels.triton.skinny_gemm import DTYPES, skinny_linear

_ACT_AND_MUL = {"silu": silu_and_mul, "gelu_tanh": gelu_tanh_and_mul}
#: the most rows the swap-AB stream takes (``skinny_gemm.py``); above, cuBLAS. At 64 rows it
#: lost on the 4096-wide Yi-6B stack (3,527 -> 4,118 us) and on Qwen2.5-3B's (1-2 %), at
#: 128-232 rows on every stack (H200, docs/benchmarks.md session 15).
SKINNY_ROWS = 32
#: ``MODELHIVE_SKINNY=0``: cuBLAS at 3..SKINNY_ROWS rows too (A/B measurements)
USE_SKINNY = os.environ.get("MODELHIVE_SKINNY", "1") != "0"


def _skinny(x: torch.Tensor, weight: torch.Tensor, gated: bool = False) -> bool:
    """Whether the swap-AB stream takes this linear: bf16/fp16, 3..SKINNY_ROWS rows, and an
    output at least as wide as the input (q/k/v, o, gate_up). A down projection (K of 2.7-5.4x
    N) has too few 64-row weight tiles to fill the chip with its long rows and stays cuBLAS
    (TinyLlama 12.8 vs 11.0 us at 32 rows, the best of a split-K sweep)."""
    return (USE_SKINNY and x.shape[0] <= SKINNY_ROWS and x.dtype in DTYPES
            and (gated or weight.shape[0] >= weight.shape[1]))


def norm_linear(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, offset: float,
                weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if x.shape[0] <= GEMV_MAX_ROWS:
        return gemv(x, weight, bias, prologue="rmsnorm", norm_weight=norm_weight, eps=eps,
                    offset=offset)
    if _skinny(x, weight):
        return skinny_linear(rms_norm(x, norm_weight, eps, offset), weight, bias)
    return F.linear(rms_norm(x, norm_weight, eps, offset), weight, bias)


def norm_linear_act(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, offset: float,
                    weight: torch.Tensor, act: str) -> torch.Tensor:
    if x.shape[0] <= GEMV_MAX_ROWS:
        return gemv(x, weight, prologue="rmsnorm", norm_weight=norm_weight, eps=eps,
                    offset=offset, act=act)
    if _skinny(x, weight, gated=True):
        return skinny_linear(rms_norm(x, norm_weight, eps, offset), weight, act=act)
    return _ACT_AND_MUL[act](F.linear(rms_norm(x, norm_weight, eps, offset), weight))


def linear_add(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    if x.shape[0] <= GEMV_MAX_ROWS and residual.stride(-1) == 1:
        return gemv(x, weight, residual=residual, out=residual)
    if _skinny(x, weight) and residual.stride(-1) == 1:
        return skinny_linear(x, weight, residual=residual, out=residual)
    return residual.addmm_(x, weight.t())


def logits(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    if x.shape[0] <= GEMV_MAX_ROWS:
        if out is None:
            out = torch.empty((x.shape[0], weight.shape[0]), dtype=torch.float32, device=x.device)
        return gemv(x, weight, out=out)
    # in the model dtype: a float32 copy of [rows, vocab] was 115 us of a 1.9 ms step at 256
    # rows (Qwen2.5-0.5B, H200), and the sampler needs float32 only for the rows it draws from
    if out is None:
        return F.linear(x, weight)
    return torch.mm(x, weight.t(), out=out)
