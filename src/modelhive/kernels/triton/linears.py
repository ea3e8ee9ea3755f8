"""The fused linears of ``reference.py`` on CUDA: cuBLAS GEMMs with the neighbouring ops folded
into as few launches as cuBLAS allows.

- ``norm_linear``: the Triton RMSNorm kernel, then ``F.linear``.
- ``linear_add``: ``residual.addmm_(x, weight.T)``: the residual add runs in cuBLAS's epilogue
  (beta = 1) and the result overwrites ``residual`` (the residual stream's old value is dead by
  then); an out-of-place ``addmm`` would first copy ``residual`` with one more kernel.
- ``act_linear_add``: the Triton act-and-mul kernel, then ``addmm_`` as above.

Measured (H200, bf16, inside CUDA graphs, ``bench/gpu_linear_tune.py`` at commit aa141c3): a
Triton GEMM that normalised or activated its input in the prologue and added the residual in the
epilogue (one kernel per linear) was 1.1-5x slower than these cuBLAS calls at decode batch sizes
(1 and 32): cuBLAS's GEMV splits K across CTAs, the Triton kernel streamed long K rows serially
(e.g. TinyLlama's down projection, K = 5632: 50 us vs 8 us). The small kernels it would have
saved cost ~7 us per TinyLlama layer in total, so it was removed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from modelhive.kernels.triton.activation import gelu_tanh_and_mul, silu_and_mul
from modelhive.kernels.triton.rmsnorm import rms_norm

_ACT_AND_MUL = {"silu": silu_and_mul, "gelu_tanh": gelu_tanh_and_mul}


def norm_linear(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, offset: float,
                weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(rms_norm(x, norm_weight, eps, offset), weight, bias)


def linear_add(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    return residual.addmm_(x, weight.t())


def act_linear_add(x: torch.Tensor, act: str, weight: torch.Tensor,
                   residual: torch.Tensor) -> torch.Tensor:
    return residual.addmm_(_ACT_AND_MUL[act](x), weight.t())
