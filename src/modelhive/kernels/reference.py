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

Fused linears (x ``[M, K]``, weight ``[N, K]`` as ``nn.Linear``; the pre-norm decoder's residual
stream ``h`` is updated by the two ``*_add`` ops, so no separate add or norm runs between them):
- ``norm_linear(x, norm_weight, eps, offset, weight, bias)``: ``linear(rms_norm(x), weight, bias)``.
- ``linear_add(x, weight, residual)``: ``residual + x @ weight.T``.
- ``act_linear_add(x, act, weight, residual)``: ``residual + act_and_mul(x) @ weight.T`` with
  ``act`` "silu" or "gelu_tanh" (x is the fused gate_up output ``[M, 2K]``).

CPU only: every weight above may also be a oneDNN-packed tensor from ``pack_linear_weight`` (same
shape and values, opaque layout; ``weight.is_mkldnn``). The CPU runner packs bfloat16/float16
linears once at start: a plain bf16 ``F.linear`` re-lays the weight out on every call, which costs
about as much as the GEMM itself at small batches.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from modelhive.runner.attn_metadata import AttentionMetadata


def store_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    meta: AttentionMetadata,
) -> None:
    index = (meta.slot_blocks, meta.slot_offsets)
    k_cache[index] = k if k.dtype == k_cache.dtype else k.to(k_cache.dtype)
    v_cache[index] = v if v.dtype == v_cache.dtype else v.to(v_cache.dtype)


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
    softcap: float | None,
) -> torch.Tensor:
    """q [B, H, Q, D], k/v [B, KVH, L, D], mask [B, 1, Q, L] (True = attend) -> [B, H, Q, D]."""
    group = q.shape[1] // k.shape[1]
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                              enable_gqa=group > 1)
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores.float(), dim=-1).to(v.dtype), v)


def _decode_attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   meta: AttentionMetadata, scale: float, sliding_window: int | None,
                   softcap: float | None) -> torch.Tensor:
    """The decodes' attention (one query per sequence): q ``[D, H, Dh]`` -> ``[D, H, Dh]``.

    K and V are read as whole blocks (``meta.decode_blocks``: one ``index_select`` each, keys
    ``[D, nb * T, KVH * Dh]``), past-the-end and out-of-window keys get -inf from
    ``meta.decode_bias``. GQA without repeating K/V: each query head is laid into a zero row
    ``[KVH * Dh]`` at its kv head's slot, so one batched GEMM gives every head's scores against
    its own kv head (the other kv heads' products are exact zeros); the output keeps each head's
    own slot. Scores are float32 (softmax in float32, probabilities back in the cache dtype, as
    transformers' eager attention computes them). On this 2-core CPU that is ~5x faster than
    gathering token by token and attending with grouped einsums at 64 sequences.
    """
    d, h, dh = q.shape
    kvh = k_cache.shape[2]
    g = h // kvh
    blocks, nb = meta.decode_blocks
    length = nb * k_cache.shape[1]
    k = torch.index_select(k_cache, 0, blocks).view(d, length, kvh * dh)
    v = torch.index_select(v_cache, 0, blocks).view(d, length, kvh * dh)
    if kvh == 1:
        q_wide = q.to(k.dtype)
    else:
        q_wide = q.new_zeros(d, kvh, g, kvh, dh, dtype=k.dtype)
        torch.diagonal(q_wide, dim1=1, dim2=3).copy_(q.view(d, kvh, g, dh).permute(0, 2, 3, 1))
        q_wide = q_wide.view(d, h, kvh * dh)
    scores = torch.bmm(q_wide, k.transpose(1, 2))  # [D, H, L]
    bias = meta.decode_bias(sliding_window)
    if softcap is None:
        scores = torch.add(bias, scores, alpha=scale)
    else:
        scores = torch.tanh(scores.float() * (scale / softcap)) * softcap + bias
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    out = torch.bmm(probs, v)  # [D, H, KVH * Dh]
    if kvh == 1:
        return out
    out = torch.diagonal(out.view(d, kvh, g, kvh, dh), dim1=1, dim2=3)  # [D, G, Dh, KVH]
    return out.permute(0, 3, 1, 2).reshape(d, h, dh)


def _decode_attend_one(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """One decode without softcap or window, q ``[1, H, Dh]``: its blocks gathered
    (``meta.decode_blocks`` is exactly its table for one decode), the keys cut to its length,
    and the two products as float32 ``bmm`` per kv head (``[KVH, G, Dh] @ [KVH, Dh, n]``; q's
    heads are kv-major, so the views need no copy). Ten small ops, ~4x faster on this CPU than
    SDPA's flash kernel for one query; a bfloat16 ``bmm`` of this size costs ~20 us of fixed
    overhead where float32 takes ~4 us. Scores and probabilities stay float32 (more exact than
    the batched path, which rounds scores to the cache dtype)."""
    _, h, dh = q.shape
    kvh = k_cache.shape[2]
    n = meta.seq_lens_host[0]
    blocks, _ = meta.decode_blocks
    k = torch.index_select(k_cache, 0, blocks).view(-1, kvh, dh)[:n].float()  # [n, KVH, Dh]
    v = torch.index_select(v_cache, 0, blocks).view(-1, kvh, dh)[:n].float()
    scores = torch.bmm(q.reshape(kvh, h // kvh, dh).float(), k.permute(1, 2, 0))  # [KVH, G, n]
    probs = torch.softmax(scores.mul_(scale), dim=-1)
    return torch.bmm(probs, v.transpose(0, 1)).view(1, h, dh).to(q.dtype)


class _PromptBatch(NamedTuple):
    """This step's whole prompts (sequences with nothing cached before the step), laid out as one
    padded batch ``[S, Lmax]`` (``rows``: the token row of each slot, padding repeats a prompt's
    last token) for one causal SDPA; ``(out_seq, out_pos)`` pick the real slots of its output in
    token order, ``token_rows`` are those tokens' rows in the step."""

    seqs: tuple[int, ...]
    others: tuple[int, ...]  # the step's other non-decode sequences (chunks after cached tokens)
    rows: torch.Tensor  # [S, Lmax] int64
    slot_blocks: torch.Tensor  # [S, Lmax] int64: pool block of each slot's token
    slot_offsets: torch.Tensor  # [S, Lmax] int64
    out_seq: torch.Tensor  # [tokens] int64
    out_pos: torch.Tensor  # [tokens] int64
    token_rows: torch.Tensor  # [tokens] int64


#: (metadata, {key: value}) of the last step: things derived from a step's metadata once and
#: shared by all layers (the metadata object is per step; a new one starts a new cache)
_step_cache: tuple[object, dict] = (None, {})


def _per_step(meta: AttentionMetadata, key: str, make):
    global _step_cache
    cache = _step_cache
    if cache[0] is not meta:
        cache = (meta, {})
        _step_cache = cache
    if key not in cache[1]:
        cache[1][key] = make(meta)
    return cache[1][key]


def _prompt_batch(meta: AttentionMetadata) -> _PromptBatch | None:
    return _per_step(meta, "prompts", _make_prompt_batch)


def _make_prompt_batch(meta: AttentionMetadata) -> _PromptBatch | None:
    """None unless at least two whole prompts share the step and padding them to the longest at
    most doubles their tokens (one long prompt with short ones takes the per-sequence path)."""
    qsl, lens = meta.query_start_loc_host, meta.seq_lens_host
    seqs = tuple(s for s in range(meta.num_decodes, meta.num_seqs)
                 if lens[s] == qsl[s + 1] - qsl[s])
    if len(seqs) < 2:
        return None
    longest = max(lens[s] for s in seqs)
    tokens = sum(lens[s] for s in seqs)
    if len(seqs) * longest > 2 * tokens:
        return None
    rows = [qsl[s] + min(i, lens[s] - 1) for s in seqs for i in range(longest)]
    out_seq = [j for j, s in enumerate(seqs) for _ in range(lens[s])]
    out_pos = [i for s in seqs for i in range(lens[s])]
    token_rows = [t for s in seqs for t in range(qsl[s], qsl[s + 1])]
    device = meta.positions.device
    rows_t = torch.tensor(rows, dtype=torch.long, device=device).view(len(seqs), longest)
    batched = set(seqs)
    others = tuple(s for s in range(meta.num_decodes, meta.num_seqs) if s not in batched)
    return _PromptBatch(seqs, others, rows_t, meta.slot_blocks[rows_t], meta.slot_offsets[rows_t],
                        torch.tensor(out_seq, dtype=torch.long, device=device),
                        torch.tensor(out_pos, dtype=torch.long, device=device),
                        torch.tensor(token_rows, dtype=torch.long, device=device))


def _attend_prompts(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    prompts: _PromptBatch, scale: float) -> torch.Tensor:
    """Causal attention of whole prompts as ONE SDPA call over a padded batch: ``q`` rows and
    the prompts' keys/values (read back from the pool slots this step stored them in) gathered
    into ``[S, Lmax]``; with ``is_causal`` a real query only sees real keys (padding comes after
    every real position), and padded queries are dropped. Returns ``[tokens, H, Dh]`` for
    ``prompts.token_rows``. On this 2-core CPU: one call instead of one mask, two gathers and
    one SDPA per prompt and layer (~4x less attention time for 64 prompts of ~15 tokens)."""
    s, longest = prompts.rows.shape
    _, h, dh = q.shape
    kvh = k_cache.shape[2]
    qp = torch.index_select(q, 0, prompts.rows.view(-1)).view(s, longest, h, dh).transpose(1, 2)
    kp = k_cache[prompts.slot_blocks, prompts.slot_offsets].transpose(1, 2)  # [S, KVH, L, Dh]
    vp = v_cache[prompts.slot_blocks, prompts.slot_offsets].transpose(1, 2)
    o = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=scale,
                                       enable_gqa=kvh != h)  # [S, H, L, Dh]
    del qp, kp, vp  # the activation peak: only o and the result below
    return o[prompts.out_seq, :, prompts.out_pos]  # [tokens, H, Dh]


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    d = meta.num_decodes
    if d:
        if d == 1 and softcap is None and sliding_window is None:
            decoded = _decode_attend_one(q[:d], k_cache, v_cache, meta, scale)
        else:
            decoded = _decode_attend(q[:d], k_cache, v_cache, meta, scale, sliding_window,
                                     softcap)
        if d == meta.num_seqs:  # a decode-only step: no output buffer to fill
            return decoded
    prompts = (_prompt_batch(meta) if softcap is None and sliding_window is None
               and q.device.type == "cpu" else None)
    if prompts is not None and not d and len(prompts.seqs) == meta.num_seqs:
        return _attend_prompts(q, k_cache, v_cache, prompts, scale)  # only whole prompts
    out = torch.empty_like(q)
    if d:
        out[:d] = decoded
    others: Iterable[int] = range(d, meta.num_seqs)
    if prompts is not None:
        out[prompts.token_rows] = _attend_prompts(q, k_cache, v_cache, prompts, scale)
        others = prompts.others
    qsl = meta.query_start_loc_host
    T = meta.tokens_per_block
    for s in others:
        start, end = qsl[s], qsl[s + 1]
        seq_len = meta.seq_lens_host[s]
        q_len = end - start
        key_pos = torch.arange(seq_len, device=q.device)
        blocks = meta.block_tables[s].long()[key_pos // T]
        k = k_cache[blocks, key_pos % T]  # [L, KVH, Dh]
        v = v_cache[blocks, key_pos % T]
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
        mask = key_pos.unsqueeze(0) <= q_pos.unsqueeze(1)
        if sliding_window is not None:
            mask &= key_pos.unsqueeze(0) > (q_pos.unsqueeze(1) - sliding_window)
        o = _attend(q[start:end].transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0),
                    v.transpose(0, 1).unsqueeze(0), mask[None, None], scale, softcap)
        out[start:end] = o.squeeze(0).transpose(0, 1)
    return out


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


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T (+ bias)``, the weight plain or packed by ``pack_linear_weight``."""
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The LM head: ``linear(x, weight)`` in the model dtype, as float32."""
    return linear(x, weight).float()


def norm_linear(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, offset: float,
                weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return linear(rms_norm(x, norm_weight, eps, offset), weight, bias)


def linear_add(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``residual + x @ weight.T`` as one GEMM with the add in its epilogue (beta = 1)."""
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, None, "add")
    return torch.addmm(residual, x, weight.t())


def act_linear_add(x: torch.Tensor, act: str, weight: torch.Tensor,
                   residual: torch.Tensor) -> torch.Tensor:
    return linear_add(ACT_AND_MUL[act](x), weight, residual)
