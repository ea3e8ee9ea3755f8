"""Gated activations on the fused gate_up output: ``act(x[..., :I]) * x[..., I:]``.

Contracts (``reference.silu_and_mul`` / ``reference.gelu_tanh_and_mul``): the activation is computed
in float32 and rounded to ``x.dtype``, then the product is rounded, as the reference's two
elementwise ops are. Returns a new contiguous ``[..., I]`` tensor.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)


@triton.jit
def gated_act(gate, up, dtype: tl.constexpr, GELU_TANH: tl.constexpr):
    """``act(gate) * up`` rounded as the reference rounds it: act in float32, cast to ``dtype``,
    the product in float32, cast to ``dtype``. Shared with the fused down projection."""
    gate = gate.to(tl.float32)
    if GELU_TANH:
        inner = _SQRT_2_OVER_PI * (gate + 0.044715 * gate * gate * gate)
        act = 0.5 * gate * (1.0 + libdevice.tanh(inner))
    else:
        act = gate / (1.0 + tl.exp(-gate))
    return (act.to(dtype).to(tl.float32) * up.to(tl.float32)).to(dtype)


@triton.jit
def _act_and_mul_kernel(x_ptr, out_ptr, stride_xn, inter, GELU_TANH: tl.constexpr,
                        BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    dtype = out_ptr.dtype.element_ty
    gate = tl.load(x_ptr + row * stride_xn + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_xn + inter + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * inter + cols, gated_act(gate, up, dtype, GELU_TANH), mask=mask)


def _act_and_mul(x: torch.Tensor, gelu_tanh: bool) -> torch.Tensor:
    inter = x.shape[-1] // 2
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty((x2.shape[0], inter), dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        block = min(1024, triton.next_power_of_2(inter))
        _act_and_mul_kernel[(x2.shape[0], triton.cdiv(inter, block))](
            x2, out, x2.stride(0), inter, GELU_TANH=gelu_tanh, BLOCK=block,
            num_warps=4 if block >= 512 else 1,
        )
    return out.view(*x.shape[:-1], inter)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    return _act_and_mul(x, gelu_tanh=False)


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    return _act_and_mul(x, gelu_tanh=True)
