"""Fused RMSNorm, optionally with the residual add in front (one pass over the row).

Contracts (``reference.rms_norm`` / ``reference.rms_norm_residual``):
- ``rms_norm(x, w, eps, offset) = x / rms(x) * (offset + w)`` in float32, cast to ``x.dtype``;
  ``x`` is ``[..., D]`` (2-D hidden states or 3-D ``[N, heads, D]`` for qk-norm, any row strides).
- ``rms_norm_residual(x, residual, w, eps, offset)``: ``residual' = x + residual`` rounded to the
  model dtype (as the unfused add is), returns ``(rms_norm(residual'), residual')``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    rows_per_n, stride_xn, stride_xh, stride_rn, stride_rh, D, eps, offset,
    HAS_RESIDUAL: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)
    n = (row // rows_per_n).to(tl.int64)
    h = row % rows_per_n
    d = tl.arange(0, BLOCK_D)
    mask = d < D
    x = tl.load(x_ptr + n * stride_xn + h * stride_xh + d, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + n * stride_rn + h * stride_rh + d, mask=mask, other=0.0)
        summed = (x + r.to(tl.float32)).to(out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row.to(tl.int64) * D + d, summed, mask=mask)
        x = summed.to(tl.float32)
    var = tl.sum(x * x, 0) / D
    rstd = 1.0 / tl.sqrt_rn(var + eps)
    w = tl.load(w_ptr + d, mask=mask, other=0.0).to(tl.float32)
    y = (x * rstd) * (offset + w)
    tl.store(out_ptr + row.to(tl.int64) * D + d, y.to(out_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> tuple[int, int, int]:
    """(rows per leading index, stride of the leading index, stride of the head index)."""
    if t.dim() == 2:
        return 1, t.stride(0), 0
    if t.dim() == 3:
        return t.shape[1], t.stride(0), t.stride(1)
    raise ValueError(f"rms_norm takes [N, D] or [N, heads, D], got shape {tuple(t.shape)}")


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
            offset: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    if x.dim() > 3:
        x = x.reshape(-1, x.shape[-1])
        residual = None if residual is None else residual.reshape(-1, x.shape[-1])
    if x.stride(-1) != 1:
        x = x.contiguous()
    if residual is not None and (residual.stride(-1) != 1 or residual.shape != x.shape):
        residual = residual.expand_as(x).contiguous()
    dim = x.shape[-1]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    res_out = torch.empty_like(out) if residual is not None else None
    num_rows = x.numel() // dim
    if num_rows == 0:
        return out, res_out
    rows_per_n, sxn, sxh = _rows(x)
    if residual is not None:
        _, srn, srh = _rows(residual)
    else:
        srn = srh = 0
    block_d = triton.next_power_of_2(dim)
    _rms_norm_kernel[(num_rows,)](
        x, residual if residual is not None else x, weight, out,
        res_out if res_out is not None else out,
        rows_per_n, sxn, sxh, srn, srh, dim, float(eps), float(offset),
        HAS_RESIDUAL=residual is not None, BLOCK_D=block_d,
        num_warps=min(16, max(1, block_d // 256)),
    )
    return out, res_out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    return _launch(x, None, weight, eps, offset)[0]


def rms_norm_residual(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                      offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    out, res_out = _launch(x, residual, weight, eps, offset)
    assert res_out is not None
    return out, res_out
