"""The fused linears of ``reference.py`` on CUDA.

Decode-sized inputs (at most ``gemv.GEMV_MAX_ROWS`` rows: batch-1 decode, short prompts) take the
Triton GEMV of ``gemv.py``: one kernel per linear with the RMSNorm in its prologue and bias +
residual or the gated activation (gate_up) in its epilogue, launched with PDL so the weight
stream runs on across kernel boundaries. Larger inputs are compute-shaped and take cuBLAS:

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

import torch
import torch.nn.functional as F

from modelhive.kernels.triton.activation import gelu_tanh_and_mul, silu_and_mul
from modelhive.kernels.triton.gemv import GEMV_MAX_ROWS, gemv
from modelhive.kernels.triton.rmsnorm import rms_norm

_ACT_AND_MUL = {"silu": silu_and_mul, "gelu_tanh": gelu_tanh_and_mul}


def norm_linear(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, offset: float,
                weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if x.shape[0] <= GEMV_MAX_ROWS:
        return gemv(x, weight, bias, prologue="rmsnorm", norm_weight=norm_weight, eps=eps,
                    offset=offset)
    return F.linear(rms_norm(x, norm_weight, eps, offset), weight, bias)


def norm_linear_act(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, offset: float,
                    weight: torch.Tensor, act: str) -> torch.Tensor:
    if x.shape[0] <= GEMV_MAX_ROWS:
        return gemv(x, weight, prologue="rmsnorm", norm_weight=norm_weight, eps=eps,
                    offset=offset, act=act)
    return _ACT_AND_MUL[act](F.linear(rms_norm(x, norm_weight, eps, offset), weight))


def linear_add(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    if x.shape[0] <= GEMV_MAX_ROWS and residual.stride(-1) == 1:
        return gemv(x, weight, residual=residual, out=residual)
    return residual.addmm_(x, weight.t())


def logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if x.shape[0] <= GEMV_MAX_ROWS:
        return gemv(x, weight, out=torch.empty((x.shape[0], weight.shape[0]),
                                               dtype=torch.float32, device=x.device))
    # in the model dtype: a float32 copy of [rows, vocab] was 115 us of a 1.9 ms step at 256
    # rows (Qwen2.5-0.5B, H200), and the sampler needs float32 only for the rows it draws from
    return F.linear(x, weight)
