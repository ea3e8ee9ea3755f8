"""Plain-PyTorch kernels: the CPU path, and the reference every GPU kernel is tested against.

Contracts (shared with ``kernels/triton/*``):
- ``store_kv(k_cache, v_cache, k, v, meta)``: writes the step's new keys/values ``[N, kv_heads, D]``
  into the pool views ``[num_blocks, T, kv_heads, D]`` at ``(meta.slot_blocks, meta.slot_offsets)``.
- ``paged_attention(q, k_cache, v_cache, meta, scale, sliding_window, softcap)``: ``q`` is
  ``[N, heads, D]``; returns ``[N, heads, D]``. Each query at position p attends to the keys of its
  own sequence at positions ``k <= p`` (and ``k > p - sliding_window`` when a window is given), read
  from the pool through the block table. GQA: query head h uses kv head ``h // (heads // kv_heads)``.
- ``rms_norm(x, weight, eps, offset)``: ``x / rms(x) * (offset + weight)``, computed in float32.
- ``apply_rope(x, positions, inv_freq)``: rotate-half RoPE on ``[N, heads, D]``.
- ``rope_store_kv(q, k, v, positions, inv_freq, k_cache, v_cache, meta)``: RoPE on q and k, the
  rotated k and v stored as ``store_kv`` does; returns the rotated q (the GPU kernel rotates ``q``
  in place and returns it: callers must not reuse the unrotated ``q``).
- ``silu_and_mul(x)``: ``silu(x[..., :I]) * x[..., I:]`` for the fused gate_up output.
- ``argmax(logits, out)``: ``[rows, vocab]`` -> int64 ``[rows]``, the first index of each row's
  maximum (greedy tokens), written to ``out`` when given.

Fused linears (x ``[M, K]``, weight ``[N, K]`` as ``nn.Linear``; the pre-norm decoder's residual
stream ``h`` is updated by the two ``*_add`` ops, so no separate add or norm runs between them):
- ``norm_linear(x, norm_weight, eps, offset, weight, bias)``: ``linear(rms_norm(x), weight, bias)``.
- ``linear_add(x, weight, residual)``: ``residual + x @ weight.T``.
- ``norm_linear_act(x, norm_weight, eps, offset, weight, act)``: ``act_and_mul(norm_linear(x,
  ..., weight))`` with ``act`` "silu" or "gelu_tanh" and ``weight`` the fused gate_up ``[2I, K]``:
  the gated MLP's first half, ``[M, I]``.

``store_kv`` and ``paged_attention`` live in ``reference_attention.py`` (re-exported here).

CPU only: every weight above may also be a oneDNN-packed tensor from ``pack_linear_weight`` (same
shape and values, opaque layout; ``weight.is_mkldnn``). The CPU runner packs bfloat16/float16
linears once at start: a plain bf16 ``F.linear`` re-lays the weight out on every call, which costs
about as much as the GEMM itself at small batches. oneDNN packs bf16 only on CPUs with AVX-512
(BW, VL, DQ) or AVX-NE-CONVERT, and fp16 on fewer: ``cpu_packs`` asks it once per dtype, and
where it cannot the linears stay plain (slower, same results up to summation order).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from modelhive.kernels.reference_attention import paged_attention, store_kv  # noqa: F401 (re-exported)
from modelhive.runner.attn_metadata import AttentionMetadata


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """``x / rms(x) * (offset + weight)`` in float32 (torch's ``rms_norm``: the same arithmetic
    as the written-out form; on the CPU, bfloat16/float16 take ``_rms_norm_cpu``)."""
    if offset == 0.0 and weight.dtype == x.dtype:  # the fused op upcasts to float32 inside
        if x.dtype in PACKED_DTYPES and x.device.type == "cpu" and x.numel() <= _LN_MAX_ELEMENTS:
            return _rms_norm_cpu(x, weight, eps)
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return F.rms_norm(x.float(), (x.shape[-1],), offset + weight.float(), eps).to(x.dtype)


#: ``_rms_norm_cpu`` up to this many elements (910 rows of SmolLM2's 576, 256 of a 2,048-wide
#: model): it saves per-op overhead on decode-sized steps, which dominates there; on a
#: 2,048-token step it raised the process's peak RSS (the CPU dry step's activation reading) by
#: 30-90 MiB, above the plan, for ~1 % of that step's time
_LN_MAX_ELEMENTS = 1 << 19


def _rms_norm_cpu(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``rms_norm`` as ONE fused kernel: ``layer_norm`` of ``[x, -x]`` (mean exactly 0 up to
    rounding, variance ``mean(x**2)``), whose first half is ``x / rms(x) * weight``, computed in
    float32 and rounded once, as ``F.rms_norm`` does. On the CPU torch's ``rms_norm`` is six
    separate ops (~25 us at one row on this 2-core machine, ~45 us at 64 rows) and
    ``layer_norm`` is one vectorised kernel; with the ``cat`` and ``neg`` this takes about half
    of that. The doubled weight is made once per weight (and again if it changes in place)."""
    h = x.shape[-1]
    version = 0 if weight.is_inference() else weight._version
    cached = getattr(weight, "_mh_doubled", None)
    if cached is None or cached[0] != version:
        cached = (version, torch.cat((weight.detach(), weight.detach())))
        weight._mh_doubled = cached
    return F.layer_norm(torch.cat((x, x.neg()), dim=-1), (2 * h,), cached[1], None, eps)[..., :h]


def apply_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
               attention_scaling: float = 1.0) -> torch.Tensor:
    """Rotate-half RoPE. x [N, heads, D], positions [N], inv_freq [D/2] (float32)."""
    return rotate_half_rope(x, *rope_cos_sin(positions, inv_freq, x.dtype, attention_scaling))


def rope_store_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                  inv_freq: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  meta: AttentionMetadata, attention_scaling: float = 1.0,
                  cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None,
                  tables: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """RoPE on q and k, k and v into the pool; returns the rotated q. ``cos_sin``: this step's
    ``rope_cos_sin``, or ``tables``: its ``rope_tables``, when the caller computed them once for
    all layers. When k directly follows q in memory (the heads of one fused qkv output), both are
    rotated as one tensor."""
    if tables is None:
        cos, sin = cos_sin or rope_cos_sin(positions, inv_freq, q.dtype, attention_scaling)
        tables = rope_tables(cos, sin)
    heads = q.shape[1]
    if _adjacent_heads(q, k):
        qk = rotate_rope(q.as_strided((q.shape[0], heads + k.shape[1], q.shape[2]), q.stride()),
                         tables)
        store_kv(k_cache, v_cache, qk[:, heads:], v, meta)
        return qk[:, :heads]
    store_kv(k_cache, v_cache, rotate_rope(k, tables), v, meta)
    return rotate_rope(q, tables)


def norm_linear_act(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, offset: float,
                    weight: torch.Tensor, act: str) -> torch.Tensor:
    """``act_and_mul(norm_linear(x, ..., weight))``: the gated MLP's first half, ``weight`` the
    fused gate_up ``[2I, K]``; returns ``[M, I]``."""
    return ACT_AND_MUL[act](norm_linear(x, norm_weight, eps, offset, weight))


def _adjacent_heads(q: torch.Tensor, k: torch.Tensor) -> bool:
    """k's heads start right after q's in memory, with the same row stride (so ``[q | k]`` is
    one strided ``[N, heads + kv_heads, D]`` view)."""
    d = q.shape[-1]
    return (q.dim() == 3 and k.dim() == 3 and q.dtype == k.dtype and q.shape[0] == k.shape[0]
            and q.shape[2] == k.shape[2] and q.stride(2) == 1 and q.stride(1) == d
            and k.stride() == q.stride()
            and k.data_ptr() == q.data_ptr() + q.shape[1] * d * q.element_size())


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype,
                 attention_scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin ``[N, 1, D/2]`` in ``dtype`` (computed in float32, as transformers does)."""
    freqs = positions.float().unsqueeze(1) * inv_freq.unsqueeze(0)  # [N, D/2]
    return ((freqs.cos() * attention_scaling).to(dtype).unsqueeze(1),
            (freqs.sin() * attention_scaling).to(dtype).unsqueeze(1))


def rotate_half_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def rope_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``rope_cos_sin`` ``[N, 1, D/2]`` -> full-width ``(cat(cos, cos), cat(-sin, sin))``
    ``[N, 1, D]`` for ``rotate_rope``."""
    return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)


def rotate_rope(x: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``rotate_half_rope`` in four ops: ``x * cos2 + roll(x, D/2) * sin2`` (``rope_tables``).
    Bit-identical to it: each half is the same two rounded products, added (the sign of the
    first half's sine product is exact)."""
    cos2, sin2 = tables
    return x * cos2 + torch.roll(x, x.shape[-1] // 2, dims=-1) * sin2


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return F.silu(x[..., :half]).mul_(x[..., half:])  # in place on silu's fresh output


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return F.gelu(x[..., :half], approximate="tanh") * x[..., half:]


ACT_AND_MUL = {"silu": silu_and_mul, "gelu_tanh": gelu_tanh_and_mul}


#: dtypes whose CPU linears run on oneDNN-packed weights (``pack_linear_weight``)
PACKED_DTYPES = (torch.bfloat16, torch.float16)


def pack_linear_weight(weight: torch.Tensor) -> torch.Tensor:
    """A CPU weight ``[N, K]`` re-laid out once for oneDNN's GEMM (an opaque ``is_mkldnn`` tensor
    of the same shape and values); ``linear`` and the fused linears below accept it."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


@functools.cache
def cpu_packs(dtype: torch.dtype) -> bool:
    """Whether this CPU's oneDNN packs and multiplies ``dtype`` weights (``pack_linear_weight``):
    tried once on a small matrix, since torch only raises when the instructions are missing."""
    if dtype not in PACKED_DTYPES:
        return False
    try:
        packed = pack_linear_weight(torch.ones(16, 32, dtype=dtype))
        linear(torch.ones(2, 32, dtype=dtype), packed)
    except RuntimeError:
        return False
    return True


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T (+ bias)``, the weight plain or packed by ``pack_linear_weight``."""
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def logits(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The LM head: ``linear(x, weight)`` in the model dtype, as float32 (into ``out``)."""
    result = linear(x, weight).float()
    return result if out is None else out.copy_(result)


def argmax(logits: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy tokens: the first index of each row's maximum, int64 ``[rows]`` (into ``out``)."""
    idx = logits.max(dim=-1).indices  # = argmax (first maximum), ~2x faster on the CPU
    return idx if out is None else out.copy_(idx)


def norm_linear(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, offset: float,
                weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return linear(rms_norm(x, norm_weight, eps, offset), weight, bias)


def linear_add(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``residual + x @ weight.T`` as one GEMM with the add in its epilogue (beta = 1)."""
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, None, "add")
    return torch.addmm(residual, x, weight.t())

