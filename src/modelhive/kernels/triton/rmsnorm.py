"""Fused RMSNorm (one pass over the row).

Contract (``reference.rms_norm``): ``rms_norm(x, w, eps, offset) = x / rms(x) * (offset + w)`` in
float32, cast to ``x.dtype``; ``x`` is ``[..., D]`` (2-D hidden states or 3-D ``[N, heads, D]``
for qk-norm, any row strides). Decode-sized batches of the Llama family normalise inside the next
linear instead (``gemv.py``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from modelhive.kernels.triton import pdl


@triton.jit
def _rms_norm_kernel(
    x_ptr, w_ptr, out_ptr, rows_per_n, stride_xn, stride_xh, D, eps, offset,
    BLOCK_D: tl.constexpr, USE_PDL: tl.constexpr, PDL_EARLY: tl.constexpr,
):
    pdl.wait(USE_PDL, PDL_EARLY)  # x comes from the previous kernel (pdl.py)
    row = tl.program_id(0)
    n = (row // rows_per_n).to(tl.int64)
    h = row % rows_per_n
    d = tl.arange(0, BLOCK_D)
    mask = d < D
    x = tl.load(x_ptr + n * stride_xn + h * stride_xh + d, mask=mask, other=0.0).to(tl.float32)
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


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    if x.dim() > 3:
        x = x.reshape(-1, x.shape[-1])
    if x.stride(-1) != 1:
        x = x.contiguous()
    dim = x.shape[-1]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    num_rows = x.numel() // dim
    if num_rows == 0:
        return out
    rows_per_n, sxn, sxh = _rows(x)
    block_d = triton.next_power_of_2(dim)
    use_pdl = pdl.enabled(x)
    _rms_norm_kernel[(num_rows,)](
        x, weight, out, rows_per_n, sxn, sxh, dim, float(eps), float(offset), BLOCK_D=block_d,
        USE_PDL=use_pdl, PDL_EARLY=pdl.EARLY, launch_pdl=use_pdl,
        num_warps=min(16, max(1, block_d // 256)),
    )
    return out
